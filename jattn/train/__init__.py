"""Training: state, sharded steps, loop, checkpoints, logging."""
