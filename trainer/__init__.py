"""Training: config, losses, optimizer and LR, backends (DeepSpeed, Accelerate), the loop, checkpoints,
metrics, and the evaluate/export/bench CLIs."""
