"""Train state, steps, checkpoints, metrics and the training loop."""
