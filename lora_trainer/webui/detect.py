"""Which WebUI we run in, without importing it."""

import importlib.util


def is_forge() -> bool:
    """Forge ships its own Lora code inside its model patcher; it is recognised by its ``modules_forge`` package."""
    return importlib.util.find_spec("modules_forge") is not None
