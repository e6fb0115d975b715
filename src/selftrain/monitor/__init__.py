"""The external drift monitor: instruments, the probe stage, checkpoints and the validation harness."""
