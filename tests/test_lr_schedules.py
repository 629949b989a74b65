"""The learning-rate curves are the ones sd-scripts gets from diffusers/transformers, step for step."""

from __future__ import annotations

import re

import pytest
import torch

from lora_trainer.errors import UserError
from lora_trainer.training.lr_schedules import lr_factor, make_scheduler, resolve_warmup
from lora_trainer.training.optimizers import make_optimizer
from lora_trainer.training.options import parse_args

diffusers_optimization = pytest.importorskip("diffusers.optimization")
transformers_optimization = pytest.importorskip("transformers.optimization")

BASE_LR = 3e-4


def two_group_optimizer(lr: float = BASE_LR) -> torch.optim.Optimizer:
    # two groups with different rates, like text encoder and U-Net
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr / 4}]
    return torch.optim.SGD(groups, lr=lr)


def lr_history(scheduler, steps: int) -> list[list[float]]:
    """The rates each of ``steps`` optimizer steps uses, as the trainer steps the scheduler after each."""
    history = []
    for _ in range(steps):
        history.append([group["lr"] for group in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return history


CASES = [
    # name, total steps, lr_warmup_steps as the user gives it, num_cycles, power
    ("constant", 40, 0, 1, 1.0),
    ("constant_with_warmup", 40, 7, 1, 1.0),
    ("constant_with_warmup", 40, 0.25, 1, 1.0),
    ("linear", 37, 0, 1, 1.0),
    ("linear", 37, 0.1, 1, 1.0),
    ("cosine", 50, 0, 1, 1.0),
    ("cosine", 50, 0.15, 1, 1.0),
    ("cosine_with_restarts", 61, 0, 3, 1.0),
    ("cosine_with_restarts", 61, 5, 4, 1.0),
    ("cosine_with_restarts", 61, 0.05, 1, 1.0),
    ("polynomial", 45, 0, 1, 1.0),
    ("polynomial", 45, 6, 1, 2.0),
    ("polynomial", 45, 0.2, 1, 0.5),
]


@pytest.mark.parametrize("name, total, warmup, cycles, power", CASES)
def test_every_step_equals_diffusers_get_scheduler(name, total, warmup, cycles, power):
    # sd-scripts turns a ratio into int(ratio * total) before calling the library
    library_warmup = int(warmup * total) if isinstance(warmup, float) else warmup
    expected = lr_history(diffusers_optimization.get_scheduler(
        name, two_group_optimizer(), num_warmup_steps=library_warmup, num_training_steps=total,
        num_cycles=cycles, power=power), total + 3)
    ours = lr_history(make_scheduler(two_group_optimizer(), name, total, warmup, num_cycles=cycles, power=power), total + 3)
    assert ours == expected  # exact floats: same arithmetic, not merely close


def test_factor_is_the_multiplier_the_scheduler_applies():
    total, warmup = 30, 4
    ours = lr_history(make_scheduler(two_group_optimizer(), "cosine_with_restarts", total, warmup, num_cycles=2), total)
    assert [rates[0] for rates in ours] == [BASE_LR * lr_factor("cosine_with_restarts", step, total, warmup, num_cycles=2)
                                            for step in range(total)]
    assert lr_factor("linear", 0, 10, 2) == 0.0 and lr_factor("linear", 2, 10, 2) == 1.0 and lr_factor("linear", 10, 10, 2) == 0.0


def test_cosine_with_min_lr_equals_transformers_with_sd_scripts_half_cycles():
    total, warmup, cycles, floor = 40, 5, 1, 0.1
    expected = lr_history(transformers_optimization.get_scheduler(
        "cosine_with_min_lr", two_group_optimizer(), num_warmup_steps=warmup, num_training_steps=total,
        scheduler_specific_kwargs={"num_cycles": cycles / 2, "min_lr_rate": floor}), total + 2)
    ours = lr_history(make_scheduler(two_group_optimizer(), "cosine_with_min_lr", total, warmup, num_cycles=cycles,
                                     min_lr_ratio=floor), total + 2)
    assert ours == expected
    assert min(rates[0] for rates in ours[warmup:]) == pytest.approx(BASE_LR * floor)


@pytest.mark.parametrize("given, total, steps", [(0, 100, 0), (10, 100, 10), (0.1, 95, 9), (0.999, 10, 9), ("5%", 200, 10),
                                                  ("0.5", 7, 3), (None, 50, 0), (1, 50, 1), (1.0, 50, 50), ("100%", 50, 50)])
def test_warmup_as_steps_or_fraction_of_all_steps(given, total, steps):
    assert resolve_warmup(given, total) == steps


@pytest.mark.parametrize("given", [1.5, -1, "ten", "-5%", float("nan"), "150%"])
def test_unusable_warmup_is_refused_by_name(given):
    with pytest.raises(UserError, match="--lr_warmup_steps"):
        resolve_warmup(given, 100)


def test_unknown_scheduler_names_the_option_and_the_valid_values():
    with pytest.raises(UserError, match="--lr_scheduler 'cosine_annealing'") as error:
        make_scheduler(two_group_optimizer(), "cosine_annealing", 10, 0)
    assert "cosine_with_restarts" in str(error.value) and "polynomial" in str(error.value)


def test_constant_with_warmup_steps_is_refused_as_sd_scripts_does():
    with pytest.raises(UserError, match="constant_with_warmup"):
        make_scheduler(two_group_optimizer(), "constant", 10, 3)


def test_cosine_with_min_lr_needs_the_ratio():
    with pytest.raises(UserError, match="--lr_scheduler_min_lr_ratio"):
        make_scheduler(two_group_optimizer(), "cosine_with_min_lr", 10, 0)


def test_adafactor_relative_step_keeps_the_rate_whatever_the_schedule():
    parameter = torch.nn.Parameter(torch.ones(3, 2))
    optimizer = make_optimizer("Adafactor", [{"params": [parameter], "lr": 1e-3}], 1e-3, [])
    history = lr_history(make_scheduler(optimizer, "cosine", 10, 0), 10)
    assert history == [[1e-3]] * 10
    fixed_rate = make_optimizer("Adafactor", [{"params": [parameter], "lr": 1e-3}], 1e-3, ["relative_step=False"])
    assert lr_history(make_scheduler(fixed_rate, "cosine", 10, 0), 3)[2][0] < 1e-3


def test_resumed_scheduler_continues_the_same_curve():
    total, warmup = 20, 3
    uninterrupted = lr_history(make_scheduler(two_group_optimizer(), "polynomial", total, warmup, power=2.0), total)
    first = make_scheduler(two_group_optimizer(), "polynomial", total, warmup, power=2.0)
    before = lr_history(first, 8)
    resumed = make_scheduler(two_group_optimizer(), "polynomial", total, warmup, power=2.0)
    resumed.load_state_dict(first.state_dict())
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    assert before + lr_history(resumed, total - 8) == uninterrupted


def test_a_torch_scheduler_class_replaces_the_schedule_as_sd_scripts_lr_scheduler_type_does():
    """The Kohya GUI's "1 image" preset: --lr_scheduler_type CosineAnnealingLR --lr_scheduler_args T_max=1000 eta_min=0e-0."""
    ours = make_scheduler(two_group_optimizer(), "cosine", 10, 0, scheduler_type="CosineAnnealingLR",
                          scheduler_args=["T_max=8", "eta_min=0e-0"])
    reference = two_group_optimizer()
    torch_curve = lr_history(torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=8, eta_min=0.0), 10)
    assert lr_history(ours, 10) == torch_curve and torch_curve[8] == [0.0, 0.0]
    full_path = make_scheduler(two_group_optimizer(), "constant", 10, 0, scheduler_type="torch.optim.lr_scheduler.StepLR",
                               scheduler_args=["step_size=2", "gamma=0.5"])
    assert [rates[0] / BASE_LR for rates in lr_history(full_path, 5)] == [1.0, 1.0, 0.5, 0.5, 0.25]


@pytest.mark.parametrize("scheduler_type, arguments, warmup, message", [
    ("os.system", [], 0, "give a class of torch.optim.lr_scheduler"),  # no other module is imported: a job body names it
    ("LambdaLR", [], 0, "takes a function"),
    ("ReduceLROnPlateau", [], 0, "steps on a validation metric"),
    ("StepLR", ["step_size=2"], 3, "takes no warm-up, as in sd-scripts"),
    ("StepLR", [], 0, "step_size"),  # the class's own complaint, with the option names
])
def test_unusable_scheduler_classes_and_arguments_are_refused_by_name(scheduler_type, arguments, warmup, message):
    with pytest.raises(UserError, match=message) as error:
        make_scheduler(two_group_optimizer(), "constant", 10, warmup, scheduler_type=scheduler_type, scheduler_args=arguments)
    assert "--lr_scheduler_type" in str(error.value)


def test_reduce_on_plateau_is_refused_for_its_reason_where_torch_does_not_subclass_it(monkeypatch):
    """torch 2.1 (the WebUI's) has ReduceLROnPlateau outside the LRScheduler hierarchy: still refused for what it is."""
    class OldReduceLROnPlateau:  # noqa: the 2.1 shape: a plain class
        pass
    monkeypatch.setattr(torch.optim.lr_scheduler, "ReduceLROnPlateau", OldReduceLROnPlateau)
    with pytest.raises(UserError, match="steps on a validation metric"):
        make_scheduler(two_group_optimizer(), "constant", 10, 0, scheduler_type="ReduceLROnPlateau", scheduler_args=[])


@pytest.mark.parametrize("total, warmup, decay, cycles, floor", [(40, 5, 10, 1, None), (40, 0, 0.25, 2, 0.1), (33, 0.1, 0, 1, None)])
def test_warmup_stable_decay_equals_transformers_as_sd_scripts_calls_it(total, warmup, decay, cycles, floor):
    """sd-scripts' warmup_stable_decay: --lr_decay_steps (steps or a fraction), the rest stable, num_cycles / 2 cosines
    down to --lr_scheduler_min_lr_ratio (0 when not given)."""
    warmup_steps = int(warmup * total) if isinstance(warmup, float) else warmup
    decay_steps = int(decay * total) if isinstance(decay, float) else decay
    expected = lr_history(transformers_optimization.get_wsd_schedule(
        two_group_optimizer(), num_warmup_steps=warmup_steps, num_decay_steps=decay_steps,
        num_stable_steps=total - warmup_steps - decay_steps, num_cycles=cycles / 2, min_lr_ratio=floor or 0.0), total + 2)
    ours = lr_history(make_scheduler(two_group_optimizer(), "warmup_stable_decay", total, warmup, num_cycles=cycles,
                                     min_lr_ratio=floor, decay=decay), total + 2)
    assert ours == expected  # exact floats: the same arithmetic


@pytest.mark.parametrize("warmup, timescale", [(0, None), (8, None), (8, 20)])
def test_inverse_sqrt_equals_transformers_with_sd_scripts_timescale(warmup, timescale):
    expected = lr_history(transformers_optimization.get_inverse_sqrt_schedule(
        two_group_optimizer(), num_warmup_steps=warmup, timescale=timescale), 60)
    ours = lr_history(make_scheduler(two_group_optimizer(), "inverse_sqrt", 50, warmup, timescale=timescale), 60)
    assert ours == expected


# --lr_scheduler_args on a built-in schedule: sd-scripts passes them to the library function it calls
SCHEDULE_ARGUMENT_CASES = [
    ("cosine", ["num_cycles=1.5"], lambda o, w, t: transformers_optimization.get_cosine_schedule_with_warmup(o, w, t, num_cycles=1.5)),
    ("polynomial", ["lr_end=1e-5"], lambda o, w, t: transformers_optimization.get_polynomial_decay_schedule_with_warmup(
        o, w, t, lr_end=1e-5, power=1.0)),
    ("cosine_with_min_lr", ["min_lr=3e-5"], lambda o, w, t: transformers_optimization.get_cosine_with_min_lr_schedule_with_warmup(
        o, w, t, num_cycles=0.5, min_lr=3e-5)),
    ("warmup_stable_decay", ["warmup_type='cosine'", "decay_type='1-sqrt'"], lambda o, w, t: transformers_optimization.get_wsd_schedule(
        o, w, num_decay_steps=10, num_stable_steps=t - w - 10, warmup_type="cosine", decay_type="1-sqrt", num_cycles=0.5)),
    ("warmup_stable_decay", ["warmup_type='1-sqrt'", "decay_type='linear'"], lambda o, w, t: transformers_optimization.get_wsd_schedule(
        o, w, num_decay_steps=10, num_stable_steps=t - w - 10, warmup_type="1-sqrt", decay_type="linear", num_cycles=0.5)),
]


@pytest.mark.parametrize("name, arguments, library", SCHEDULE_ARGUMENT_CASES)
def test_schedule_arguments_change_the_built_in_schedules_as_in_sd_scripts(name, arguments, library):
    total, warmup = 40, 6
    expected = lr_history(library(two_group_optimizer(), warmup, total), total + 2)
    ours = lr_history(make_scheduler(two_group_optimizer(), name, total, warmup, scheduler_args=arguments, decay=10), total + 2)
    assert ours == expected  # exact floats
    plain = lr_history(make_scheduler(two_group_optimizer(), name, total, warmup, min_lr_ratio=0.0, decay=10), total + 2)
    assert ours != plain  # the arguments changed the curve


def test_piecewise_constant_follows_its_step_rules_as_diffusers_does():
    rules = "1:10,0.1:20,0.01:30,0.005"
    expected = lr_history(diffusers_optimization.get_piecewise_constant_schedule(two_group_optimizer(), rules), 40)
    ours = lr_history(make_scheduler(two_group_optimizer(), "piecewise_constant", 40, 0,
                                     scheduler_args=[f"step_rules='{rules}'"]), 40)
    assert ours == expected
    assert [rates[0] for rates in ours[9:11]] == [BASE_LR, BASE_LR * 0.1] and ours[-1][0] == BASE_LR * 0.005


@pytest.mark.parametrize("name, arguments, warmup, message", [
    ("cosine", ["lr_end=1e-5"], 0, "--lr_scheduler_args lr_end: --lr_scheduler cosine takes num_cycles"),
    ("linear", ["num_cycles=2"], 0, "--lr_scheduler linear takes none"),
    ("cosine", ["last_epoch=5"], 0, "--resume"),
    ("polynomial", ["lr_end='small'"], 0, "lr_end='small': give a number"),
    ("warmup_stable_decay", ["decay_type='exp'"], 0, "decay_type='exp': give one of linear, cosine, 1-sqrt"),
    ("piecewise_constant", [], 0, "needs its rules as a quoted string"),
    ("piecewise_constant", ["step_rules=1:10,0.1"], 0, "must be a Python literal"),  # unquoted: sd-scripts fails too
    ("piecewise_constant", ["step_rules='1-10,0.1'"], 0, "write factor:step pairs"),
    ("piecewise_constant", ["step_rules='1:10,0.1'"], 5, "takes no warm-up"),
])
def test_unusable_schedule_arguments_are_refused_before_training_with_the_fix(name, arguments, warmup, message):
    with pytest.raises(UserError, match=re.escape(message)):
        make_scheduler(two_group_optimizer(), name, 40, warmup, scheduler_args=arguments)
    options = ["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "d", "--lr_scheduler", name,
               "--lr_warmup_steps", str(warmup)] + (["--lr_scheduler_args", *arguments] if arguments else [])
    with pytest.raises(UserError, match=re.escape(message)):
        parse_args(options)
