"""Optimizers by sd-scripts' names: arguments reach them, Lion/Adafactor do the published updates, errors say what to do."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lora_trainer.compat import SCALES_LOSS_ON_CPU
from lora_trainer.errors import UserError
from lora_trainer.networks.spec import NetworkSpec
from lora_trainer.training.flat_adamw import FlatAdamW
from lora_trainer.training.optimizers import Adafactor, Lion, make_optimizer, optimizer_label, parse_optimizer_args
from reference import REFERENCE


def groups(lr: float = 1e-4) -> list[dict]:
    # the trainer's shape of groups: text encoder and U-Net at their own rates, with a description
    return [{"params": [torch.nn.Parameter(torch.ones(3, 2))], "lr": lr / 2, "description": "textencoder"},
            {"params": [torch.nn.Parameter(torch.ones(4))], "lr": lr, "description": "unet"}]


def fixture_optimizer_labels() -> set[str]:
    text = (REFERENCE / "kohya-tiny-lora-keys.txt").read_text(encoding="utf-8")
    return {line.split(" = ", 1)[1] for line in text.splitlines() if line.startswith("ss_optimizer = ")}


def test_optimizer_args_are_python_literals_as_sd_scripts_reads_them():
    assert parse_optimizer_args(["weight_decay=0.01", "betas=0.9,0.999", "decouple=True", "eps=1e-8", "name='x=y'"]) == {
        "weight_decay": 0.01, "betas": (0.9, 0.999), "decouple": True, "eps": 1e-8, "name": "x=y"}
    assert parse_optimizer_args(None) == {}


@pytest.mark.parametrize("arguments, problem", [(["weight_decay"], "key=value"), (["decouple=yes"], "Python literal"),
                                                (["foo=1"], "foo")])
def test_bad_optimizer_args_are_named(arguments, problem):
    with pytest.raises(UserError, match="--optimizer_args") as error:
        make_optimizer("AdamW", groups(), 1e-4, arguments)
    assert problem in str(error.value)


@pytest.mark.parametrize("optimizer_type", ["", "AdamW", "adamw", "ADAMW"])
def test_adamw_is_the_default_and_names_ignore_case(optimizer_type):
    optimizer = make_optimizer(optimizer_type, groups(), 1e-4, ["weight_decay=0.05", "betas=0.8,0.95", "eps=1e-6"])
    assert type(optimizer) is FlatAdamW and isinstance(optimizer, torch.optim.AdamW)
    assert [group["lr"] for group in optimizer.param_groups] == [5e-5, 1e-4]
    assert all(group["weight_decay"] == 0.05 and group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
               for group in optimizer.param_groups)
    assert [group["description"] for group in optimizer.param_groups] == ["textencoder", "unet"]


def test_ss_optimizer_has_the_format_of_sd_scripts_metadata():
    labels = fixture_optimizer_labels()
    with_args = make_optimizer("AdamW", groups(), 1e-4, ["weight_decay=0.01", "betas=0.9,0.99"])
    plain = make_optimizer("AdamW", groups(), 1e-4, None)
    assert optimizer_label(with_args) == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))"
    assert {optimizer_label(with_args), optimizer_label(plain)} <= labels
    made_elsewhere = torch.optim.AdamW(groups(), lr=1e-4, weight_decay=0.01, betas=(0.9, 0.99))
    assert optimizer_label(made_elsewhere, ["weight_decay=0.01", "betas=0.9,0.99"]) in labels
    # the built-in stand-ins are named as the classes sd-scripts trains with (tools read ss_optimizer)
    assert optimizer_label(make_optimizer("Lion", groups(), 1e-4, [])) == "lion_pytorch.lion_pytorch.Lion"
    assert optimizer_label(make_optimizer("Adafactor", groups(), 1e-4, ["relative_step=False"])).startswith(
        "transformers.optimization.Adafactor(relative_step=False")


def test_sgd_nesterov_gets_sd_scripts_momentum_and_shows_it():
    optimizer = make_optimizer("SGDNesterov", groups(), 1e-3, [])
    assert type(optimizer) is torch.optim.SGD
    assert all(group["nesterov"] and group["momentum"] == 0.9 for group in optimizer.param_groups)
    assert optimizer_label(optimizer) == "torch.optim.sgd.SGD(momentum=0.9)"
    assert make_optimizer("SGDNesterov", groups(), 1e-3, ["momentum=0.5"]).param_groups[0]["momentum"] == 0.5
    assert not make_optimizer("sgd", groups(), 1e-3, []).param_groups[0]["nesterov"]


def test_other_torch_optimizers_and_module_paths_as_in_sd_scripts():
    assert type(make_optimizer("RAdam", groups(), 1e-3, [])) is torch.optim.RAdam
    assert type(make_optimizer("lora_trainer.training.optimizers.Lion", groups(), 1e-3, [])) is Lion


def test_unknown_optimizer_lists_the_valid_names():
    with pytest.raises(UserError, match="--optimizer_type 'AdamX'") as error:
        make_optimizer("AdamX", groups(), 1e-4, [])
    assert all(name in str(error.value) for name in ("AdamW8bit", "Lion", "Prodigy", "DAdaptAdam", "Adafactor"))


@pytest.mark.parametrize("optimizer_type, package", [("AdamW8bit", "bitsandbytes"), ("PagedAdamW8bit", "bitsandbytes"),
                                                     ("Lion8bit", "bitsandbytes"), ("DAdaptation", "dadaptation"),
                                                     ("DAdaptAdam", "dadaptation"), ("prodigy", "prodigyopt"),
                                                     ("pytorch_optimizer.CAME", "pytorch_optimizer")])
def test_missing_optional_package_says_what_to_install(monkeypatch, optimizer_type, package):
    monkeypatch.setitem(sys.modules, package, None)  # None in sys.modules makes its import fail
    with pytest.raises(UserError, match=f"pip install {package}") as error:
        make_optimizer(optimizer_type, groups(), 1.0, [])
    assert "extras folder" in str(error.value) and optimizer_type in str(error.value)


def test_a_missing_package_is_said_before_queueing_with_how_to_install_it_there(monkeypatch, tmp_path):
    """Outside the WebUI (no extras folder) pip into this Python; inside it, the Install extras button, which offers
    every package an optimizer needs."""
    from lora_trainer.app.extras import EXTRAS
    from lora_trainer.training.optimizers import OPTIMIZERS, check_optimizer_installed

    monkeypatch.setitem(sys.modules, "dadaptation", None)
    with pytest.raises(UserError) as refused:
        check_optimizer_installed("DAdaptAdam")
    assert str(refused.value) == (f"--optimizer_type DAdaptAdam needs the Python package dadaptation, which is not "
                                  f"installed: run `{sys.executable} -m pip install dadaptation`, or choose AdamW, which "
                                  "needs none")
    with pytest.raises(UserError, match="tick dadaptation among the optional trainer extras and press Install extras"):
        check_optimizer_installed("DAdaptAdam", tmp_path / "extras")
    assert {source.pip_package for source in OPTIMIZERS.values() if source.pip_package} <= set(EXTRAS)
    check_optimizer_installed("AdamW"), check_optimizer_installed("Lion")  # torch's and ours need nothing


def test_optional_optimizer_gets_the_rate_and_the_arguments(monkeypatch):
    prodigyopt = types.ModuleType("prodigyopt")

    class Prodigy(torch.optim.SGD):
        def __init__(self, params, lr=1.0, d_coef=1.0, **kwargs):
            super().__init__(params, lr=lr, **kwargs)
            self.d_coef = d_coef

    Prodigy.__module__ = "prodigyopt"
    prodigyopt.Prodigy = Prodigy
    monkeypatch.setitem(sys.modules, "prodigyopt", prodigyopt)
    optimizer = make_optimizer("Prodigy", groups(1.0), 1.0, ["d_coef=2", "weight_decay=0.01"])
    assert type(optimizer) is Prodigy and optimizer.d_coef == 2
    assert [group["lr"] for group in optimizer.param_groups] == [0.5, 1.0]
    assert optimizer_label(optimizer) == "prodigyopt.Prodigy(d_coef=2,weight_decay=0.01)"


def test_lion_first_steps_equal_the_papers_update_by_hand():
    # c = b1*m + (1-b1)*g ; theta -= lr*(sign(c) + wd*theta) ; m = b2*m + (1-b2)*g, with lr 0.1, b 0.9/0.99, wd 0.01
    parameter = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    optimizer = make_optimizer("Lion", [{"params": [parameter], "lr": 0.1}], 0.1, ["weight_decay=0.01"])
    gradients = [[0.5, -1.0, 0.0], [-0.1, 0.03, 0.4], [0.0, 0.0, -0.5]]
    # step 2: second entry, momentum -0.01 outweighs the gradient 0.03 (c = -0.009 + 0.003 < 0), so it still goes up;
    # first entry, c = 0.0045 - 0.01 < 0 follows the gradient where b2's mix (0.00495 - 0.001) would not
    by_hand = [[0.899, -1.898, 0.4995], [0.998101, -1.796102, 0.3990005], [0.897102899, -1.694305898, 0.4986014995]]
    for gradient, expected in zip(gradients, by_hand):
        parameter.grad = torch.tensor(gradient, dtype=torch.float64)
        optimizer.step()
        assert parameter.detach().tolist() == pytest.approx(expected, abs=1e-12)
    assert optimizer.state[parameter]["exp_avg"].tolist() == pytest.approx([0.0039105, -0.009504, -0.00104], abs=1e-12)
    assert optimizer_label(optimizer) == "lion_pytorch.lion_pytorch.Lion(weight_decay=0.01)"


ADAFACTOR_SETTINGS = [
    # (our --optimizer_args, transformers' Adafactor arguments with sd-scripts' defaults applied)
    ([], {"lr": None, "relative_step": True}),
    (["warmup_init=True"], {"lr": None, "relative_step": True, "warmup_init": True}),
    (["scale_parameter=False", "relative_step=False", "warmup_init=False"],
     {"lr": 1e-3, "scale_parameter": False, "relative_step": False, "warmup_init": False}),
    (["relative_step=False", "beta1=0.9", "weight_decay=0.1", "clip_threshold=0.5"],
     {"lr": 1e-3, "relative_step": False, "beta1": 0.9, "weight_decay": 0.1, "clip_threshold": 0.5}),
]


@pytest.mark.parametrize("arguments, transformers_kwargs", ADAFACTOR_SETTINGS)
def test_adafactor_follows_transformers_adafactor_that_sd_scripts_uses(arguments, transformers_kwargs):
    transformers_optimization = pytest.importorskip("transformers.optimization")
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=generator), torch.randn(4, generator=generator)]
    gradients = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(6)]
    ours_params = [torch.nn.Parameter(p.clone()) for p in start]
    theirs_params = [torch.nn.Parameter(p.clone()) for p in start]
    ours = make_optimizer("Adafactor", [{"params": ours_params, "lr": 1e-3}], 1e-3, arguments)
    theirs = transformers_optimization.Adafactor(theirs_params, **transformers_kwargs)
    for step_gradients in gradients:
        for ours_p, theirs_p, gradient in zip(ours_params, theirs_params, step_gradients):
            ours_p.grad, theirs_p.grad = gradient.clone(), gradient.clone()
        ours.step()
        theirs.step()
    for ours_p, theirs_p, first in zip(ours_params, theirs_params, start):
        assert not torch.equal(ours_p, first)
        torch.testing.assert_close(ours_p, theirs_p, rtol=1e-6, atol=1e-7)


def test_adafactor_defaults_and_label_as_sd_scripts_fills_them_in():
    default = make_optimizer("adafactor", groups(), 1e-4, [])
    assert type(default) is Adafactor and default.uses_relative_step
    assert optimizer_label(default) == "transformers.optimization.Adafactor(relative_step=True)"
    forced = make_optimizer("Adafactor", groups(), 1e-4, ["relative_step=False", "warmup_init=True"])
    assert forced.uses_relative_step  # sd-scripts: warmup_init switches the relative step back on
    fixed = make_optimizer("Adafactor", groups(), 1e-4, ["relative_step=False", "scale_parameter=False"])
    assert not fixed.uses_relative_step
    assert optimizer_label(fixed) == "transformers.optimization.Adafactor(relative_step=False,scale_parameter=False)"


def test_adafactor_updates_half_precision_weights_in_place():
    parameter = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16))
    optimizer = make_optimizer("Adafactor", [{"params": [parameter], "lr": 1e-2}], 1e-2, ["relative_step=False"])
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    assert parameter.dtype == torch.bfloat16 and bool((parameter < 1).all())


@pytest.mark.skipif(not SCALES_LOSS_ON_CPU, reason="torch < 2.3 scales the loss on CUDA only (fp16 on the CPU is refused)")
def test_loss_scaling_unscales_the_fp16_gradients_of_a_full_fp16_network():
    """--full_fp16 keeps the network's weights, so their gradients, in fp16: the loss scaler must still unscale them
    (torch's own refuses fp16 gradients) so that the step sees the true gradient."""
    from lora_trainer.training.trainer import NetworkGradScaler

    weight = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scaler = NetworkGradScaler("cpu", init_scale=2.0**10)
    scaler.scale((weight.float() * 1e-3).sum()).backward()
    assert torch.allclose(weight.grad.float(), torch.full((3,), 1.024), rtol=1e-3)  # scaled in the backward pass
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert weight.dtype == torch.float16 and torch.allclose(weight.float(), torch.full((3,), 0.999), atol=1e-4)


@pytest.mark.parametrize("optimizer_type", ["AdamW", "", "Prodigy", "DAdaptAdam", "torch.optim.Adam"])
def test_full_fp16_with_moments_that_vanish_in_fp16_is_refused_before_training(optimizer_type):
    from lora_trainer.training.options import TrainOptions, validate

    def options(optimizer_type: str) -> TrainOptions:
        return TrainOptions(pretrained_model_name_or_path="m.safetensors", train_data_dir="data", mixed_precision="fp16",
                            full_fp16=True, optimizer_type=optimizer_type)

    with pytest.raises(UserError, match="--full_fp16 with .*AdamW8bit or Adafactor"):
        validate(options(optimizer_type))
    validate(options("AdamW8bit"))  # 8-bit state with fp32 scales: fine


def test_a_schedule_free_optimizer_is_used_with_its_averaged_weights_and_trains_on_after():
    """sd-scripts' *ScheduleFree: trained on one sequence of weights (y), sampled and saved with another (x);
    ``evaluating`` switches there and back on the same numbers, once however deeply it is nested."""
    from lora_trainer.training.optimizers import evaluating

    parameter = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    optimizer = make_optimizer("AdamWScheduleFree", [{"params": [parameter]}], 0.1, [])
    for _ in range(3):
        parameter.grad = parameter.detach().clone()
        optimizer.step()
    training = parameter.detach().clone()
    with evaluating(optimizer):
        used = parameter.detach().clone()
        with evaluating(optimizer):
            assert torch.equal(parameter.detach(), used)
    assert not torch.allclose(used, training)  # the averaged weights, not the ones it trains on
    assert torch.allclose(parameter.detach(), training, atol=1e-6) and optimizer.param_groups[0]["train_mode"]
    with evaluating(make_optimizer("AdamW", [{"params": [parameter]}], 0.1, [])):  # others: nothing to switch
        assert torch.allclose(parameter.detach(), training, atol=1e-6)


@pytest.mark.parametrize("optimizer, rate, warned", [("Prodigy", 1e-4, True), ("DAdaptAdam", 0.05, True),
                                                     ("Prodigy", 1.0, False), ("AdamW", 1e-4, False)])
def test_an_adaptive_optimizer_at_a_small_learning_rate_is_said_to_hardly_learn(optimizer, rate, warned):
    """Prodigy and D-Adaptation take the rate as a factor on their own step size (sd-scripts warns below 0.1)."""
    import torch

    from lora_trainer.training import trainer
    from lora_trainer.training.options import options_from

    options = options_from({"pretrained_model_name_or_path": "x", "train_data_dir": "d", "optimizer_type": optimizer,
                            "learning_rate": rate, "unet_lr": rate}, "test")
    said = [w for w in trainer._option_warnings(options, NetworkSpec(), torch.device("cpu"), torch.float32) if "hardly learns" in w]
    assert bool(said) is warned


def _options(**values):
    from lora_trainer.training.options import options_from

    return options_from({"pretrained_model_name_or_path": "x", "train_data_dir": "d", **values}, "test")


@pytest.mark.parametrize("values, named", [
    ({"text_encoder_lr": 0.5}, "--learning_rate 1, --text_encoder_lr 0.5"),
    ({"unet_lr": 2.0, "network_args": ["loraplus_lr_ratio=16"]}, "--unet_lr 2, --learning_rate 1; network_args loraplus"),
    ({"network_args": ["down_lr_weight=0.5,0.5"]}, "network_args down_lr_weight"),
])
def test_prodigy_and_d_adaptation_with_different_rates_are_refused_before_the_model_loads(values, named):
    """Their own check refuses different group rates at the first step: the run died after loading and caching, with
    a message calling it a bug to report."""
    with pytest.raises(UserError, match="adapts one step size for every parameter group") as error:
        _options(optimizer_type="Prodigy", learning_rate=1.0, **values)
    assert named in str(error.value)
    _options(optimizer_type="DAdaptAdam", learning_rate=1.0, unet_lr=1.0, text_encoder_lr=0)  # 0: that part rests
    _options(optimizer_type="Prodigy", unet_lr=1.0, text_encoder_lr=1.0)  # the Train tab's form: learning_rate unused
    # block weights of 0 and 1 keep one rate (a weight-0 block has no group): sd-scripts trains these with Prodigy
    _options(optimizer_type="Prodigy", learning_rate=1.0, network_args=["down_lr_weight=zeros"])
    _options(optimizer_type="Prodigy", learning_rate=1.0, network_args=["up_lr_weight=" + ",".join(["1"] * 12)])
    _options(optimizer_type="Prodigy", learning_rate=1.0, network_args=["loraplus_lr_ratio=1"])
    with pytest.raises(UserError, match="mid_lr_weight"):  # SDXL's three middle parts: the 0.5 is a group of its own
        _options(optimizer_type="Prodigy", learning_rate=1.0, network_args=["mid_lr_weight=1,0.5,1"])
    # LoRA+ where no plus group is made: LyCORIS's LoHa has no lora_up; the text encoder's ratio on a UNet-only run
    _options(optimizer_type="Prodigy", learning_rate=1.0, network_module="lycoris.kohya",
             network_args=["algo=loha", "loraplus_lr_ratio=4"])
    _options(optimizer_type="Prodigy", learning_rate=1.0, network_train_unet_only=True,
             network_args=["loraplus_text_encoder_lr_ratio=4"])
    _options(optimizer_type="Prodigy", learning_rate=1.0, text_encoder_lr=0.5, network_train_unet_only=True)


def test_adafactor_schedule_mistakes_are_refused_with_the_option_the_user_wrote():
    with pytest.raises(UserError, match=r"Adafactor on its relative step \(its default\) takes no warm-up "
                                        r"\(--lr_warmup_steps 2\)"):
        _options(optimizer_type="Adafactor", lr_scheduler="cosine", lr_warmup_steps=2)
    with pytest.raises(UserError, match="--lr_scheduler adafactor is Adafactor's own relative step"):
        _options(optimizer_type="AdamW", lr_scheduler="adafactor")
    _options(optimizer_type="Adafactor", lr_scheduler="adafactor")


def test_a_schedule_free_optimizer_ignores_the_scheduler_options_as_sd_scripts_does():
    """sd-scripts gives schedule-free optimizers its dummy scheduler before reading anything else: a custom scheduler
    annealed the rate here, and a warm-up on constant was refused."""
    pytest.importorskip("schedulefree")
    from lora_trainer.training import trainer
    from lora_trainer.training.lr_schedules import make_scheduler

    options = _options(optimizer_type="AdamWScheduleFree", lr_scheduler="constant", lr_warmup_steps=5,
                       lr_scheduler_type="CosineAnnealingLR", lr_scheduler_args=["T_max=30"])
    said = [w for w in trainer._option_warnings(options, NetworkSpec(), torch.device("cpu"), torch.float32) if "own schedule" in w]
    assert said and "--lr_scheduler_type CosineAnnealingLR, --lr_warmup_steps 5 change nothing" in said[0]
    optimizer = make_optimizer("AdamWScheduleFree", groups(3e-3), 3e-3, [])
    scheduler = make_scheduler(optimizer, "constant", 30, 5, scheduler_type="CosineAnnealingLR",
                               scheduler_args=["T_max=30"])
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == [1.5e-3, 3e-3]


def test_adafactor_at_fixed_rates_logs_the_scheduled_rate_as_sd_scripts_does():
    """The computed step (with its RMS(θ) factor, one step behind) was logged for every Adafactor; sd-scripts logs it
    only on the relative step, and the schedule's rate otherwise."""
    from lora_trainer.training.trainer import group_rates

    fixed = make_optimizer("Adafactor", groups(1e-3), 1e-3, ["relative_step=False"])
    relative = make_optimizer("Adafactor", groups(1e-3), 1e-3, [])
    for optimizer in (fixed, relative):
        for group in optimizer.param_groups:
            with torch.no_grad():
                group["params"][0].fill_(0.3)  # RMS(θ) 0.3: scale_parameter makes the step 0.3 × lr
            group["params"][0].grad = torch.full_like(group["params"][0], 0.1)
        optimizer.step()
    assert group_rates(fixed) == {"textencoder": 5e-4, "unet": 1e-3}
    assert group_rates(relative)["unet"] == relative.param_groups[1]["step_size"] != 1e-3


def test_lion_takes_lion_pytorchs_decoupled_weight_decay_and_use_triton():
    """sd-scripts pins lion-pytorch 0.2.3, whose Lion divides a decoupled decay by the starting rate."""
    plain, decoupled = (torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64)) for _ in range(2))
    steps = [(plain, []), (decoupled, ["decoupled_weight_decay=True", "use_triton=False"])]
    for parameter, arguments in steps:
        optimizer = make_optimizer("Lion", [{"params": [parameter], "lr": 0.1}], 0.1, ["weight_decay=0.01", *arguments])
        parameter.grad = torch.tensor([0.5, -1.0], dtype=torch.float64)
        optimizer.step()
    assert plain.detach().tolist() == pytest.approx([1.0 * (1 - 0.1 * 0.01) - 0.1, -2.0 * (1 - 0.1 * 0.01) + 0.1])
    assert decoupled.detach().tolist() == pytest.approx([1.0 * (1 - 0.01) - 0.1, -2.0 * (1 - 0.01) + 0.1])

