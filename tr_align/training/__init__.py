"""Training: the train state and its one step, objectives, optimizer, the loop, checkpoints, metrics."""
