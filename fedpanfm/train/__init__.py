"""Local training: the DeepSpeed engine life-cycle, schedules and the centralized pretrain job."""
