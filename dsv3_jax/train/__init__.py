"""Training: the jitted step (`step`), losses, the aux-loss-free bias hook (`balancing`), the data pipeline
(`data`), run files (`run_config`) and the orbax-checkpointed loop (`loop`)."""
