"""Kohya-compatible LoRA trainer and Stable Diffusion model stack in pure PyTorch.

The core (this package minus ``ui/`` and ``webui/``) imports neither gradio nor the WebUI's ``modules``.
"""

__version__ = "0.1.0"
