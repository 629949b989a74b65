"""AdamW (Loshchilov & Hutter) as ``torch.optim.AdamW`` computes it, over one flat tensor per parameter group.

A LoRA is hundreds of small tensors (two per layer), and torch's AdamW and ``clip_grad_norm_`` pay their per-tensor
overhead on each: about 10 ms a step for a tiny model's 408 tensors on a 2-core CPU, against 1 ms for the same
arithmetic on one tensor. Here a group's parameters, first moments and second moments are views into three flat
tensors, so a step gathers the gradients into one flat tensor and updates everything with a few vector operations.

What torch does is kept exactly: the same operations in the same order (so a step is bit-identical to
``torch.optim.AdamW(foreach=False)``, the path sd-scripts takes on a CPU), a parameter without a gradient in a step is
left alone (its moments and step count too: DyLoRA's untrained ranks, module dropout), and the state dict is
torch's ``AdamW`` state dict, so states resume in either direction.
"""

from __future__ import annotations

import inspect
import itertools

import torch

# The base class's bookkeeping, without the decorator that imports torch._dynamo (1–2 s) on first call: it keeps
# torch.compile from tracing them, and an optimizer is never compiled here.
_add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
_state_dict = inspect.unwrap(torch.optim.Optimizer.state_dict)
_load_state_dict = inspect.unwrap(torch.optim.Optimizer.load_state_dict)


class _FlatGroup:
    """One parameter group's parameters, moments and step counts as views into flat tensors."""

    def __init__(self, params: list[torch.Tensor], state: dict):
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.offsets = list(itertools.accumulate(self.sizes, initial=0))
        self.counts = torch.tensor(self.sizes)  # elements per parameter, to spread per-parameter numbers over them
        self.values = torch.cat([p.detach().reshape(-1) for p in params])
        self.exp_avg = torch.zeros_like(self.values)
        self.exp_avg_sq = torch.zeros_like(self.values)
        self.steps = torch.zeros(len(params), dtype=torch.float32)  # torch keeps each parameter's step on the CPU
        self.uniform_steps = True  # every parameter has taken every step: the bias corrections are numbers
        for p, values in zip(params, self.values.split(self.sizes)):
            p.data = values.view_as(p)
        self.addresses = [p.data_ptr() for p in params]
        self.state = state
        self.unregistered = set(range(len(params)))  # torch gives a parameter its state at its first step
        self.device = params[0].device
        self.gradient: torch.Tensor | None = None  # gathered for this step
        self.has_gradient: list[bool] = []

    def gather(self) -> torch.Tensor:
        """The group's gradients as one flat tensor (zeros where a parameter has none); once per step."""
        if self.gradient is None:
            grads = [p.grad for p in self.params]
            self.has_gradient = [g is not None for g in grads]
            self.gradient = torch.cat([g.reshape(-1) if g is not None else self.values.new_zeros(n)
                                       for g, n in zip(grads, self.sizes)])
        return self.gradient

    def reclaim(self) -> None:
        """Points the parameters back into the flat tensor if something replaced their data (``p.data = …``)."""
        if [p.data_ptr() for p in self.params] != self.addresses:
            for p, values in zip(self.params, self.values.split(self.sizes)):
                if p.data_ptr() != values.data_ptr():
                    values.copy_(p.detach().reshape(-1))
                    p.data = values.view_as(p)

    def register(self, indices) -> None:
        """Gives these parameters their entries in the optimizer's state: views of the flat moments and steps."""
        for index in indices:
            p = self.params[index]
            start, stop = self.offsets[index], self.offsets[index + 1]
            moments = (t[start:stop].view_as(p) for t in (self.exp_avg, self.exp_avg_sq))
            self.state[p] = dict(zip(("step", "exp_avg", "exp_avg_sq"), (self.steps[index], *moments)))
        self.unregistered -= set(indices)

    def load(self, state: dict) -> None:
        """Copies a loaded state (torch's AdamW format) into the flat tensors, and makes its tensors views again."""
        self.state = state
        # built apart, then copied in: the loaded tensors may be views of these very flat tensors (a state dict of
        # this optimizer loaded back into it), which zeroing them first would wipe
        exp_avg, exp_avg_sq, steps = (torch.zeros_like(t) for t in (self.exp_avg, self.exp_avg_sq, self.steps))
        loaded = [index for index, p in enumerate(self.params) if p in state]
        for index in loaded:
            p, start, stop = self.params[index], self.offsets[index], self.offsets[index + 1]
            for flat, key in ((exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
                if key in state[p]:
                    flat[start:stop].copy_(state[p][key].reshape(-1))
            steps[index] = float(state[p].get("step", 0))
        for own, new in ((self.exp_avg, exp_avg), (self.exp_avg_sq, exp_avg_sq), (self.steps, steps)):
            own.copy_(new)
        self.unregistered = set(range(len(self.params)))
        self.register(loaded)
        self.uniform_steps = bool((self.steps == self.steps[0]).all())

    def step(self, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool) -> None:
        self.reclaim()
        grad = self.gather()
        if maximize:
            grad = -grad
        if all(self.has_gradient):
            self.steps += 1
            self._update(self.values, self.exp_avg, self.exp_avg_sq, grad, lr, beta1, beta2, eps, weight_decay)
        else:  # the update where there are gradients, the rest untouched: computed on copies, then put back
            taken = torch.tensor(self.has_gradient)
            self.steps += taken
            self.uniform_steps = False
            mask = torch.repeat_interleave(taken, self.counts).to(self.device)
            values, exp_avg, exp_avg_sq = self.values.clone(), self.exp_avg.clone(), self.exp_avg_sq.clone()
            self._update(values, exp_avg, exp_avg_sq, grad, lr, beta1, beta2, eps, weight_decay)
            for flat, updated in ((self.values, values), (self.exp_avg, exp_avg), (self.exp_avg_sq, exp_avg_sq)):
                torch.where(mask, updated, flat, out=flat)
        if self.unregistered:
            self.register([i for i in self.unregistered if self.has_gradient[i]])
        self.gradient = None

    def _update(self, values, exp_avg, exp_avg_sq, grad, lr, beta1, beta2, eps, weight_decay) -> None:
        """torch's single-tensor AdamW, in its order of operations."""
        if weight_decay != 0:
            values.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if self.uniform_steps:
            step = float(self.steps[0])
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
            values.addcdiv_(exp_avg, denom, value=-step_size)
        else:  # each parameter's own step count, element by element; the numbers in float64 as Python's are
            steps = torch.repeat_interleave(self.steps.double(), self.counts)
            bias_correction1 = 1 - beta1**steps
            bias_correction2 = 1 - beta2**steps
            step_size = (lr / bias_correction1).to(values.device, values.dtype)
            denom = (exp_avg_sq.sqrt() / (bias_correction2**0.5).to(values.device, values.dtype)).add_(eps)
            values.add_(-step_size * exp_avg / denom)  # addcdiv_ computes value · m / d in this order


class FlatAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` without amsgrad, over flat tensors (see the module's note); every parameter of a group
    must share one dtype and device. ``clip_grad_norm_`` clips the gathered gradients, as torch's function of that
    name clips the parameters' ones."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, maximize: bool = False):
        self._flat: list[_FlatGroup] = []
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                         foreach=False)

    @staticmethod
    def supports(params: list[torch.Tensor]) -> bool:
        """Whether these parameters can share flat tensors: floating point, one dtype, one device."""
        return bool(params) and all(p.is_floating_point() and p.dtype == params[0].dtype and p.device == params[0].device
                                    for p in params)

    def add_param_group(self, param_group: dict) -> None:
        _add_param_group(self, param_group)
        params = self.param_groups[-1]["params"]
        if not self.supports(params):
            raise ValueError("FlatAdamW needs each group's parameters to share one floating-point dtype and device")
        self._flat.append(_FlatGroup(params, self.state))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for flat in self._flat:
            flat.gradient = None
            for p in flat.params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scales the gradients so that their global norm is at most ``max_norm`` (torch's clip: norm of the norms,
        1e-6 added); returns the norm before clipping."""
        gradients = [flat.gather() for flat in self._flat]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradients]))
        factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for gradient in gradients:
            gradient.mul_(factor.to(gradient.device))
        return total

    def state_dict(self) -> dict:
        return _state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        _load_state_dict(self, state_dict)
        for flat in self._flat:
            flat.load(self.state)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, flat in zip(self.param_groups, self._flat):
            if group["amsgrad"]:
                raise ValueError("FlatAdamW does not implement amsgrad: use torch.optim.AdamW")
            beta1, beta2 = group["betas"]
            flat.step(float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], group["maximize"])
        return loss
