import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker, for the trainers it starts too: the tiny models' ops gain nothing from a second
    # thread, and two workers with two threads each on two cores only wait on each other
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
