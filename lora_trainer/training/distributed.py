"""Data-parallel training under ``torchrun --nproc_per_node N`` (NCCL on GPUs, gloo on CPU).

Every rank draws the same random numbers for the whole global batch (same seed, same generator), trains on its
own slice of it, and gradients are summed across ranks. So N ranks with batch b train exactly what one process
with batch N·b trains — the same order, noise and timesteps — up to the order of floating-point sums. Only rank 0
writes files and events; what it decides (stop, save now, sample now) is broadcast so no rank waits alone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import UserError

COMMANDS = (None, "stop", "save", "sample", "save+sample", "sample+stop")  # the control file's commands, as one value to share


def _dist():
    """torch.distributed, imported only under torchrun: it costs a single-process trainer half a second at start."""
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, batch_size: int) -> slice:
        """This rank's rows of a global batch (the last batch of an epoch may be short: slices stay in order)."""
        per_rank = -(-batch_size // self.size)
        return slice(min(batch_size, self.rank * per_rank), min(batch_size, (self.rank + 1) * per_rank))


def world_from_env() -> World:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def start(world: World, device: torch.device, timeout_minutes: int | None = None) -> None:
    dist = _dist() if world.distributed else None
    if dist is not None and not dist.is_initialized():
        if device.type == "cuda" and not dist.is_nccl_available():
            # said here: NCCL's absence surfaced later as "lost the others", sending users after --ddp_timeout. Every
            # rank meets it: rank 0 says it, the others exit without printing the paragraph again on the shared
            # console (status 2, as the entry point's for an error, if torchrun has not ended them by then)
            if not world.is_main:  # after rank 0 has had time to say it: torchrun ends the others at a first exit
                time.sleep(2)
                raise SystemExit(2)
            raise UserError(f"torchrun on {world.size} GPUs needs NCCL, which this torch build lacks (torch's Windows "
                            "builds have none): train on one GPU without torchrun, or on Linux or WSL")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
        # torch 2.1 (the WebUI's) refuses timeout=None: left out unless --ddp_timeout is given
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **({} if timeout is None else {"timeout": timeout}))


# gloo's: the tensors of the latest collectives, freed only after the process group. Before torch 2.8 (the WebUI's
# is 2.1) gloo's worker thread can drop the last reference to one while ~ProcessGroupGloo holds the GIL waiting for
# that thread, and destroy_process_group hangs (seen in about one run in three under torch 2.1.2). Not NCCL's: on a
# GPU the kept gradient buffer would add its size to the next step's peak memory.
_sent: dict[str, torch.Tensor] = {}


def _reduce(tensor: torch.Tensor, purpose: str, **kwargs) -> None:
    if _dist().get_backend() == "gloo":
        _sent[purpose] = tensor
    _dist().all_reduce(tensor, **kwargs)


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """NCCL reduces GPU tensors only: small bookkeeping tensors travel to the GPU and back."""
    if _dist().get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.cuda()
        _reduce(on_gpu, "bookkeeping")
        return on_gpu.to(tensor.device)
    _reduce(tensor, "bookkeeping")
    return tensor


def finish(world: World) -> None:
    if world.distributed and _dist().is_initialized():
        try:
            _dist().destroy_process_group()
        finally:
            _sent.clear()


def sum_gradients(world: World, parameters: list[torch.nn.Parameter]) -> None:
    """Each rank's loss is its slice's share of the global mean, so the sum of gradients is the global gradient."""
    if not world.distributed or not parameters:
        return
    # a parameter no rank trained this step (DyLoRA's other ranks) keeps no gradient, so the optimizer leaves it alone;
    # one trained elsewhere only (a rank without rows in a short last batch) gets zeros here to sum with
    trained = torch.tensor([float(p.grad is not None) for p in parameters], device=parameters[0].device)
    _reduce(trained, "trained", op=_dist().ReduceOp.MAX)
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for parameter, anywhere in zip(parameters, trained.tolist()):
        if not anywhere:
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        by_kind.setdefault((parameter.grad.dtype, parameter.grad.device), []).append(parameter.grad)
    # one collective per dtype and device instead of one per tensor: a network has hundreds of small gradients,
    # and each NCCL call costs tens of microseconds of latency whatever its size
    for kind, grads in by_kind.items():
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        _reduce(flat, f"gradients {kind}")
        for grad, summed in zip(grads, flat.split([grad.numel() for grad in grads])):
            grad.copy_(summed.view_as(grad))


def sum_across(world: World, tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor) if world.distributed else tensor


def agree_on_seed(world: World, seed: int) -> int:
    """Rank 0's seed for everyone (a run without --seed picks one at random on each rank)."""
    if not world.distributed:
        return seed
    # a sum in which only rank 0 counts: one collective that works on gloo and NCCL alike
    return int(_all_reduce(torch.tensor([seed if world.is_main else 0], dtype=torch.int64)))


def agree_on_command(world: World, command: str | None, signalled: bool) -> str | None:
    """Rank 0's control-file command; a signal on any rank means stop for all."""
    if not world.distributed:
        return command
    values = torch.tensor([COMMANDS.index(command) if world.is_main else 0, int(signalled)], dtype=torch.int64)
    values = _all_reduce(values)
    return "stop" if values[1] > 0 else COMMANDS[int(values[0])]
