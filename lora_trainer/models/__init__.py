"""Stable Diffusion model code (UNet, text encoders, VAE), configs and checkpoint loading."""
