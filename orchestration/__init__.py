"""What runs at the coordinator: the Flower ServerApp, the strategy, Ray aggregation, launchers."""
