"""Optimizer moments from sd-scripts' own --save_state folders (accelerate's optimizer.bin): they are numbered in the
order networks.lora (and networks.dylora, a parameter per rank, and lycoris.kohya) hands its parameters to the
optimizer, which this trainer reproduces from the Kohya names."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.errors import UserError
from lora_trainer.models.checkpoint import load_checkpoint
from lora_trainer.networks.network import create_network
from lora_trainer.networks.spec import spec_from_kohya
from lora_trainer.training.optimizers import make_optimizer
from lora_trainer.training.state import load_sd_scripts_moments, load_sd_scripts_state, sd_scripts_parameter_key
from reference import REFERENCE

DATA = Path(__file__).parent / "data"
# sd-scripts' train_network.py on the shared tiny checkpoint: networks.lora dim 1, AdamW lr 1e-3, a state and a file
# saved at every step; kept: a state (without its pickles) and the file of the step before. The second run has block
# learning rates and LoRA+, which split the parameters into 34 groups.
STATE = DATA / "sd-scripts-state-step5"
STEP4 = DATA / "sd-scripts-step4.safetensors"
BLOCKS_LORAPLUS = ("down_lr_weight=1,1,1,1,1,1,0.5,0.5,0.5,0.5,0.5,0.5", "mid_lr_weight=2",
                   "up_lr_weight=0,0,0,1,1,1,1,1,1,1,1,1", "loraplus_lr_ratio=4")
# sd-scripts with lycoris.kohya (lycoris-lora 4.1.3), preset attn-mlp (which adds the time embedding's two Linear
# layers), dim 2, AdamW lr 1e-3, 64 px, 2 steps: the state of step 2 and the file of step 1. LoCon with DoRA puts
# each module's dora_scale before its factors (LoHa's and LoKr's after theirs)
LYCORIS_RUNS = {"loha": ("algo=loha",), "lokr": ("algo=lokr",),
                "locon-dora": ("algo=locon", "dora_wd=True", "wd_on_output=True")}
RUNS = {"plain": (STATE, STEP4, (), "networks.lora", 1),
        "blocks and LoRA+": (DATA / "sd-scripts-state-blocks-loraplus", DATA / "sd-scripts-state-blocks-loraplus-step1.safetensors",
                             BLOCKS_LORAPLUS, "networks.lora", 1),
        **{f"lycoris {run}": (DATA / f"sd-scripts-state-lycoris-{run}", DATA / f"sd-scripts-state-lycoris-{run}-step1.safetensors",
                              (*network_args, "preset=attn-mlp"), "lycoris.kohya", 2)
           for run, network_args in LYCORIS_RUNS.items()}}
PARAMETERS = {"plain": 408, "blocks and LoRA+": 408, "lycoris loha": 824, "lycoris lokr": 618, "lycoris locon-dora": 618}
ORDERS = json.loads(gzip.decompress((DATA / "sd-scripts-optimizer-order.json.gz").read_bytes()))


@pytest.mark.parametrize("model", ["sd15", "sd15-conv", "sd2", "sd2-conv", "sdxl", "sdxl-conv"])
def test_the_parameter_order_is_sd_scripts_for_full_size_models(model):
    """The orders sd-scripts' networks.lora gives on its own full-size models (text encoders, then the UNet as its
    classes register their layers: SD1/SD2's mid block after the up blocks, SDXL in LDM order)."""
    names = [f"{module}.{part}.weight" for module in ORDERS[model] for part in ("lora_down", "lora_up")]
    assert sorted(reversed(names), key=sd_scripts_parameter_key) == names


def tiny_run(*network_args: str, lr: float = 1e-3, module: str = "networks.lora", dim: int = 1):
    """The network and AdamW of the run that saved the state (dim 1 on the tiny checkpoint), with other network_args."""
    model = load_checkpoint(REFERENCE / "kohya-fixtures" / "model" / "tiny-sd15.safetensors", dtype=torch.float32)
    network = create_network(model.config, model.unet, model.text_encoders,
                             spec_from_kohya(module, dim, dim, list(network_args)))
    return network, make_optimizer("AdamW", network.parameter_groups(lr), lr, [])


@pytest.mark.parametrize("run", sorted(RUNS))
def test_the_moments_of_sd_scripts_state_continue_its_adamw_exactly(run):
    """Each parameter's moments (and its group's rate) must be its own: from the previous step's weights, one AdamW
    step with the loaded moments gives the state's weights exactly. A parameter given another layer's moments (same
    shape: q and k) would not, nor one in another block's group."""
    state, previous, network_args, module, dim = RUNS[run]
    network, optimizer = tiny_run(*network_args, module=module, dim=dim)
    step = load_sd_scripts_state(state, network)
    assert load_sd_scripts_moments(state, network, optimizer) is None
    before, after = load_file(str(previous)), load_file(str(state / "model.safetensors"))
    name_of = {id(parameter): name for name, parameter in network.named_parameters()}
    checked = 0
    for group in optimizer.param_groups:
        (beta1, beta2), eps, lr, decay = group["betas"], group["eps"], group["lr"], group["weight_decay"]
        for parameter in group["params"]:
            name, moments = name_of[id(parameter)], optimizer.state[parameter]
            assert int(moments["step"]) == step
            denominator = moments["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5 + eps
            expected = before[name] * (1 - lr * decay) - lr / (1 - beta1**step) * moments["exp_avg"] / denominator
            assert torch.allclose(expected, after[name], rtol=1e-5, atol=1e-8), name
            checked += 1
    assert checked == PARAMETERS[run]


def test_a_lycoris_dora_state_on_the_other_axis_says_which_option_fits_it():
    """LyCORIS trains dora_scale on the output axis by default, this trainer on the input axis (the one the WebUI
    reads correctly): resuming sd-scripts' state with only dora_wd=True must name wd_on_output=True."""
    network, _ = tiny_run("algo=locon", "dora_wd=True", "preset=attn-mlp", module="lycoris.kohya", dim=2)
    with pytest.raises(UserError, match="dora_scale is on the other axis.*wd_on_output=True"):
        load_sd_scripts_state(DATA / "sd-scripts-state-lycoris-locon-dora", network)


def test_lycoris_moments_of_an_unknown_order_leave_the_optimizer_fresh_and_say_why():
    network, optimizer = tiny_run("algo=loha", "preset=attn-mlp", "use_scalar=True", module="lycoris.kohya", dim=2)
    why = load_sd_scripts_moments(DATA / "sd-scripts-state-lycoris-loha", network, optimizer)
    assert "LoCon, LoHa and LoKr without use_scalar" in why and not optimizer.state


def test_moments_that_do_not_fit_leave_the_optimizer_fresh_and_say_why():
    network, optimizer = tiny_run("conv_dim=1")
    assert "groups hold [24, 384] parameters where this run's hold [24, 556]" in load_sd_scripts_moments(STATE, network, optimizer)
    assert not optimizer.state
    network, _ = tiny_run()
    lion = make_optimizer("Lion", network.parameter_groups(1e-4), 1e-4, [])
    assert load_sd_scripts_moments(STATE, network, lion) == "it was saved by another optimizer (--optimizer_type)"
    network, optimizer = tiny_run("loraplus_lr_ratio=4")  # the state had no LoRA+: its groups are not these
    assert "parameter groups hold [24, 384] parameters where this run's hold [12, 12, 192, 192]" in \
        load_sd_scripts_moments(STATE, network, optimizer)


def test_a_run_resumed_from_the_state_says_it_read_the_moments(tmp_path):
    from test_training import SAMPLE

    from lora_trainer.train_network import main as train_main
    from lora_trainer.training.events import read_events

    assert train_main(["--pretrained_model_name_or_path", str(REFERENCE / "kohya-fixtures" / "model" / "tiny-sd15.safetensors"),
                       "--train_data_dir", str(SAMPLE.parent), "--output_dir", str(tmp_path), "--output_name", "star",
                       "--resolution", "64", "--train_batch_size", "4", "--network_dim", "1", "--network_alpha", "1",
                       "--max_train_steps", "7", "--caption_extension", ".txt", "--resume", str(STATE)]) == 0
    events, _ = read_events(tmp_path / "star.events.jsonl")
    said = [e["message"] for e in events if e["event"] == "warning" and "sd-scripts' state" in e["message"]]
    assert said and "its optimizer moments too (optimizer.bin)" in said[0]


# sd-scripts' train_network.py with networks.dylora dim 2, unit 1, AdamW lr 1e-3, 2 steps: a parameter per rank, and
# each module's step trained one randomly drawn rank (its Python random), so each module has its own trained ranks
DYLORA_STATE = DATA / "sd-scripts-state-dylora"


def test_a_dylora_state_resumes_with_each_ranks_moments():
    """A rank only has moments if it was trained, and only a trained rank's up column left its zero start: for every
    module, the ranks given moments must be exactly the ranks whose up column is not zero. Moments handed to another
    module (whose drawn ranks differ) or another rank would break that."""
    network, optimizer = tiny_run("unit=1", module="networks.dylora", dim=2)
    assert load_sd_scripts_state(DYLORA_STATE, network) == 2
    assert load_sd_scripts_moments(DYLORA_STATE, network, optimizer) is None
    parameters = dict(network.named_parameters())
    patterns = set()
    for name, module in network.items():
        trained = {i for i in range(2) if module.lora_up.weight[:, i].abs().sum() > 0}
        with_moments = {i for i in range(2) if parameters[f"{name}.lora_up.rank_{i}"] in optimizer.state}
        assert with_moments == trained, name
        assert {i for i in range(2) if parameters[f"{name}.lora_down.rank_{i}"] in optimizer.state} == trained, name
        patterns.add(frozenset(trained))
    assert len(patterns) > 1  # the modules drew differently: the check tells them apart
