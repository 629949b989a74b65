"""LoRA file tools: inspect, resize, merge, bake into a checkpoint, extract from two checkpoints.

The math lives in pure functions over tensors; ``commands.py`` only parses arguments and prints.
"""
