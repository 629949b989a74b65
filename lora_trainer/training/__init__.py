"""The Kohya-compatible LoRA training subprocess: options, noise and loss, optimizers, the loop, outputs, events."""
