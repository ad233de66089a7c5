"""Infrastructure under the loop: backends (DeepSpeed, Accelerate), the checkpoint layout, rank helpers,
agreement through the process group's store, and fault injection. Imports nothing from trainer.loop."""
