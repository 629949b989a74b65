import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

if "LORA_TRAINER_CACHE" not in os.environ:
    # the hash cache (hashes.json) of files the tests make goes to a folder of this run, not the user's ~/.cache
    import tempfile

    os.environ["LORA_TRAINER_CACHE"] = tempfile.mkdtemp(prefix="lora-trainer-test-cache-")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker, for the trainers it starts too: the tiny models' ops gain nothing from a second
    # thread, and two workers with two threads each on two cores only wait on each other
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
