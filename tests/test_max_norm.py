"""--scale_weight_norms: modules whose ΔW grows past the limit are shrunk back onto it (as sd-scripts does for
LoRA, and exactly for LoHa/LoKr too); the rest are untouched; the step events report it."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.errors import UserError
from lora_trainer.networks.max_norm import apply_max_norm
from lora_trainer.networks.modules import NetworkModule
from lora_trainer.networks.naming import Target
from lora_trainer.networks.registry import module_delta
from lora_trainer.networks.spec import NetworkSpec
from lora_trainer.training.options import options_from


SPECS = {"lora": NetworkSpec(), "loha": NetworkSpec(algorithm="loha"), "lokr": NetworkSpec(algorithm="lokr"),
         "dylora": NetworkSpec(algorithm="dylora", network_module="networks.dylora", unit=1),
         "lora-scalar": NetworkSpec(use_scalar=True, network_module="lycoris.kohya")}
LIMITED = ("lora", "loha", "lokr", "dylora", "lora-scalar")
SPECS["ia3"] = NetworkSpec(algorithm="ia3")


def trained_module(algorithm: str, size: float, seed: int) -> NetworkModule:
    torch.manual_seed(seed)
    layer = torch.randn(32, 16)
    module = NetworkModule.fresh(Target("lora_unet_x", "lora_unet", "x"), layer, None, 4, 2.0, SPECS[algorithm])
    state = module.state_dict()
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.dim() > 0:
            state[key] = torch.randn_like(tensor) * size
    if "scalar" in state:  # a trained scalar, folded into lora_up in the file
        state["scalar"] = torch.tensor(0.7)
    module.load_state_dict(state)
    return module


@torch.no_grad()
def delta_norm(module: NetworkModule) -> float:
    return float(module_delta(module.file_tensors(), module._base_weight[0], 1.0).weight.norm())


@pytest.mark.parametrize("algorithm", LIMITED)
def test_a_module_above_the_limit_lands_on_it_and_one_below_is_untouched(algorithm):
    big, small = trained_module(algorithm, 1.0, 1), trained_module(algorithm, 1e-3, 2)
    limit = 0.5 * delta_norm(big)
    before = {k: v.clone() for k, v in small.file_tensors().items()}
    report = apply_max_norm([big, small], limit)
    assert delta_norm(big) == pytest.approx(limit, rel=1e-4)
    assert all(torch.equal(before[k], v) for k, v in small.file_tensors().items())
    assert report.keys_scaled == 1 and report.max_norm == pytest.approx(limit, rel=1e-4)


def test_lora_up_and_down_are_each_scaled_by_the_square_root_as_sd_scripts_does():
    module = trained_module("lora", 1.0, 3)
    up, down = (module.file_tensors()[k].clone() for k in ("lora_up.weight", "lora_down.weight"))
    norm = float((up @ down).norm() * (2.0 / 4))  # alpha / dim
    apply_max_norm([module], norm / 4)
    assert torch.allclose(module.file_tensors()["lora_up.weight"], up * 0.5)
    assert torch.allclose(module.file_tensors()["lora_down.weight"], down * 0.5)


def test_unusable_limits_and_algorithms_are_refused_before_training():
    base = {"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d"}
    with pytest.raises(UserError, match="must be above 0"):
        options_from({**base, "scale_weight_norms": 0})
    with pytest.raises(UserError, match="not with DoRA"):
        options_from({**base, "scale_weight_norms": 1.0, "network_module": "lycoris.kohya",
                      "network_args": ["algo=lora", "dora_wd=True"]})
    with pytest.raises(UserError, match="not with diag-oft"):  # LyCORIS limits OFT by its own rule, not ΔW's norm
        options_from({**base, "scale_weight_norms": 1.0, "network_module": "lycoris.kohya", "network_args": ["algo=diag-oft"]})
    assert options_from({**base, "scale_weight_norms": 1.0}).scale_weight_norms == 1.0


def test_modules_lycoris_gives_no_max_norm_are_left_as_they_are():
    """iA3, GLoRA, full and train_norm's shifts: LyCORIS 4.1.3 skips them, so Kohya GUI presets pairing them with
    --scale_weight_norms (its iA3 and LoKr train_norm presets) run, with the low-rank modules still limited."""
    base = {"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d", "scale_weight_norms": 1.0,
            "network_module": "lycoris.kohya"}
    assert options_from({**base, "network_args": ["algo=ia3"]}).scale_weight_norms == 1.0
    assert options_from({**base, "network_args": ["algo=lokr", "train_norm=True"]}).scale_weight_norms == 1.0
    lora, ia3 = trained_module("lora", 1.0, 4), trained_module("ia3", 1.0, 5)
    norm = NetworkModule.fresh_norm(Target("lora_unet_n", "lora_unet", "n"), torch.ones(16), True, NetworkSpec(),
                                    torch.nn.functional.layer_norm)
    with torch.no_grad():
        norm.file_tensors()["w_norm"].fill_(100.0)
    before = {id(m): {k: v.clone() for k, v in m.file_tensors().items()} for m in (ia3, norm)}
    report = apply_max_norm([lora, ia3, norm], 1e-3)
    assert report.keys_scaled == 1 and delta_norm(lora) == pytest.approx(1e-3, rel=1e-4)
    for module in (ia3, norm):
        assert all(torch.equal(before[id(module)][k], v) for k, v in module.file_tensors().items())


def test_training_with_a_limit_reports_the_norms_and_keeps_them_under_it(tmp_path):
    from test_training import SAMPLE, run
    import shutil

    from lora_trainer.training.events import read_events

    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data / "1_zkstar")
    assert run(data, tmp_path / "out", "--scale_weight_norms", "0.05", "--learning_rate", "5e-2", "--max_train_epochs", "1") == 0
    steps = [e for e in read_events(tmp_path / "out" / "star.events.jsonl")[0] if e["event"] == "step"]
    assert steps and all(e["max_key_norm"] <= 0.05 + 1e-6 for e in steps)
    assert any(e["keys_scaled"] > 0 for e in steps)
