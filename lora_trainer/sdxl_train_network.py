"""``python -m lora_trainer.sdxl_train_network`` — the same trainer (the model version is read from the checkpoint)."""

from __future__ import annotations

import sys

from .train_network import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m lora_trainer.sdxl_train_network"))
