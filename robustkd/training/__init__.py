"""Training: the engine, losses, devices and processes, scenarios and the distillation loops."""
