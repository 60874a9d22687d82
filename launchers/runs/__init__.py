"""A run's safety and files: the folder lock, the recipe guard, checkpoints, metrics, preemption, the summary."""
