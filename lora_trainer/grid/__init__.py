"""Epoch × strength (and other) comparison grids: the Prompt-Lora-Grid core, usable standalone."""
