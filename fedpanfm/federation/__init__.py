"""What sites and the coordinator share: the message format and the aggregation maths."""
