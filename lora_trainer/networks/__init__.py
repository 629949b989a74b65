"""LoRA-family networks: the weight math of every algorithm (one file each), Kohya naming, files, applying.

Importing the package registers every algorithm, so ``registry.module_delta`` knows them all.
"""

from . import boft, dora, full, glora, ia3, lokr, loha, lora, norm, oft  # noqa: F401  (registration)
