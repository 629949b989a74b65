"""Noise schedules, samplers and our own txt2img pipeline."""
