"""Training engine: LoRA/timestep/optimizer configs, the training loop, checkpoints and export."""
