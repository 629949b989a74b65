"""TensorBoard logs with sd-scripts' tags, when ``--logging_dir`` is given (TensorBoard is an optional extra).

Run folder: ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/network_train/``; per step ``loss/current``,
``loss/average`` and ``lr/<group>`` (``lr/textencoder``, ``lr/unet``, ``lr/unet_block<i>``…, and ``lr/group<i>``
as sd-scripts' for-else adds them; ``lr/d*lr/<group>`` for D-Adaptation and Prodigy), per epoch
``loss/epoch_average`` (x axis = epoch) — so existing dashboards and comparisons keep working.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from ..errors import UserError


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def require_tensorboard(logging_dir: str | None) -> None:
    """Checked on every rank before the model loads: found only when the writer is made, the missing package cost a
    user the loading and caching, and under torchrun it left the other ranks failing with a gloo traceback."""
    if logging_dir and not tensorboard_installed():
        raise UserError("--logging_dir writes TensorBoard logs and needs the tensorboard package: pip install "
                        "tensorboard (from the WebUI: the extension's optional extras), or drop --logging_dir", "logging_dir")


class Tracker:
    def __init__(self, logging_dir: str | None, log_prefix: str | None, tracker_name: str | None):
        self.writer = None
        if not logging_dir:
            return
        require_tensorboard(logging_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # installed, but a version torch cannot use
            raise UserError(f"--logging_dir: tensorboard is installed but torch cannot use it ({error}); "
                            "pip install -U tensorboard, or drop --logging_dir", "logging_dir") from None
        self.folder = Path(logging_dir) / f"{log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}" / (tracker_name or "network_train")
        self.writer = SummaryWriter(str(self.folder))

    def step(self, step: int, loss: float, average: float, rates: dict[str, float], norms=None,
             adapted: dict[str, float] | None = None) -> None:
        """``norms``: what --scale_weight_norms did this step (``max_norm.MaxNormReport``); ``adapted``: each group's
        d·lr where the optimizer adapts its own step (D-Adaptation, Prodigy), as sd-scripts' ``lr/d*lr/<group>``."""
        if self.writer is None:
            return
        self.writer.add_scalar("loss/current", loss, step)
        self.writer.add_scalar("loss/average", average, step)
        for name, rate in rates.items():
            self.writer.add_scalar(f"lr/{name}", rate, step)
        for name, rate in (adapted or {}).items():
            self.writer.add_scalar(f"lr/d*lr/{name}", rate, step)
        # sd-scripts also logs every group after the text encoder's by number (a for-else in its generate_step_logs),
        # and dashboards that compare runs by tag look for them
        values, steps = list(rates.values()), [(adapted or {}).get(name) for name in rates]
        first = 1 if next(iter(rates), "").startswith("textencoder") else 0
        for index in range(first, len(values)):
            self.writer.add_scalar(f"lr/group{index}", values[index], step)
            if steps[index] is not None:
                self.writer.add_scalar(f"lr/d*lr/group{index}", steps[index], step)
        if norms is not None:
            self.writer.add_scalar("max_norm/keys_scaled", norms.keys_scaled, step)
            self.writer.add_scalar("max_norm/max_key_norm", norms.max_norm, step)
            self.writer.add_scalar("norm/avg_key_norm", norms.average_norm, step)

    def step_validation(self, step: int, loss: float, training_average: float) -> None:
        """The validation loss and how far it is above the training loss's running average (overfitting shows as a
        growing divergence)."""
        if self.writer is not None:
            self.writer.add_scalar("loss/validation/step_average", loss, step)
            self.writer.add_scalar("loss/validation/step_divergence", loss - training_average, step)

    def epoch(self, epoch: int, average: float, validation: float | None = None) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("loss/epoch_average", average, epoch)
        if validation is not None:
            self.writer.add_scalar("loss/validation/epoch_average", validation, epoch)
            self.writer.add_scalar("loss/validation/epoch_divergence", validation - average, epoch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
