"""Every LyCORIS-written fixture applies to its model with exactly the weight change LyCORIS's own forward makes.

The fixtures (``shared/reference/network-fixtures``) hold files of every algorithm and, per targeted layer,
the base weight and the ΔW read off LyCORIS's forward at multipliers 1 and 0.5. Here they go through the whole
user path: read the file, match its names to the model's layers, merge, change the strength, restore.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lora_trainer.networks.apply import MergedNetworks, Strength
from lora_trainer.networks.files import read_network
from lora_trainer.networks.naming import Target
from lora_trainer.networks.registry import module_delta
from reference import REFERENCE

FIXTURES = REFERENCE / "network-fixtures"
CASES = sorted(p.name.removesuffix(".expected.safetensors") for p in FIXTURES.glob("*.expected.safetensors"))
ROOTS = {"text_encoder": "lora_te", "unet": "lora_unet"}
SDXL_ROOTS = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2", "unet": "lora_unet"}
UNTOUCHED = "unet.untouched"


def _tree(weights: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree with one Linear/Conv2d per ``<path>.weight`` (plus an untargeted layer), holding those weights."""
    root = nn.Module()
    for key, tensor in weights.items():
        path, kind = key.rsplit(".", 1)
        if kind != "weight":
            continue
        *parents, leaf = path.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        has_bias = f"{path}.bias" in weights
        layer = nn.Linear(1, 1, bias=has_bias) if tensor.dim() == 2 else nn.Conv2d(1, 1, 1, bias=has_bias)
        layer.weight = nn.Parameter(tensor.clone())
        if has_bias:
            layer.bias = nn.Parameter(weights[f"{path}.bias"].clone())
        node.add_module(leaf, layer)
    return root


def _load(case: str, store: str | None = None):
    expected = load_file(FIXTURES / f"{case}.expected.safetensors")
    with safe_open(str(FIXTURES / f"{case}.expected.safetensors"), "pt") as handle:
        answer_key = json.loads(handle.metadata()["lora_name_to_module"])
    base = {k: v for k, v in expected.items() if k.endswith((".weight", ".bias"))}
    base[f"{UNTOUCHED}.weight"] = torch.randn(8, 8)
    model = _tree(base)
    roots = SDXL_ROOTS if case == "lora_sdxl" else ROOTS
    # Kohya's rule, built from the model's own module paths (not from the answer key)
    targets = {}
    for key in base:
        path, kind = key.rsplit(".", 1)
        if kind == "weight":
            root, rest = path.split(".", 1)
            name = f"{roots[root]}_{rest.replace('.', '_')}"
            targets[name] = Target(name, roots[root], path)
    merged = MergedNetworks(targets, {prefix: model for prefix in roots.values()}, store=store)
    return model, merged, expected, base, answer_key


def _changes(model: nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {key: state[key].double() - base[key].double() for key in base}


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want.double()).abs().max().item() <= 1e-5 * want.abs().max().item() + 1e-7


@pytest.mark.parametrize("store", [None, "cpu"])  # "cpu": backups and cached ΔW kept in RAM, as the WebUI hook does
@pytest.mark.parametrize("case", CASES)
def test_fixture_merges_to_lycoris_delta_at_both_strengths_and_restores_bit_exactly(case, store):
    model, merged, expected, base, answer_key = _load(case, store)
    network = read_network(FIXTURES / f"{case}.safetensors")

    (report,) = merged.set_networks([(network, Strength(1.0))])
    assert report.unmatched == [] and report.problems == [] and network.unreadable_keys == []
    assert {m.name: m.target.module for m in report.matched} == answer_key  # every module consumed, right layer

    for strength, suffix in ((1.0, ""), (0.5, "@0.5")):
        merged.set_networks([(network, Strength(strength))])  # 1.0 → 0.5 is an in-place strength change
        changes = _changes(model, base)
        for path in answer_key.values():
            assert _close(changes[f"{path}.weight"], expected[f"{path}.delta{suffix}"]), (path, strength)
            if f"{path}.delta_bias" in expected:
                assert _close(changes[f"{path}.bias"], expected[f"{path}.delta_bias{suffix}"]), (path, strength)
            elif f"{path}.bias" in base:
                assert changes[f"{path}.bias"].abs().max() == 0, path
        assert changes[f"{UNTOUCHED}.weight"].abs().max() == 0

    merged.restore()
    state = model.state_dict()
    assert all(torch.equal(state[key], base[key]) for key in base)


def test_text_encoder_and_unet_strengths_apply_to_their_own_side_only():
    model, merged, expected, base, answer_key = _load("lora")
    network = read_network(FIXTURES / "lora.safetensors")
    merged.set_networks([(network, Strength(te=0.5, unet=0.0))])
    changes = _changes(model, base)
    for path in answer_key.values():
        want = expected[f"{path}.delta@0.5"] if path.startswith("text_encoder.") else torch.zeros_like(expected[f"{path}.delta"])
        assert _close(changes[f"{path}.weight"], want), path


def test_two_networks_add_up_and_removing_one_leaves_the_other_exactly():
    model, merged, expected_lora, base, answer_key = _load("lora")
    lora = read_network(FIXTURES / "lora.safetensors")
    loha = read_network(FIXTURES / "loha.safetensors")
    expected_loha = load_file(FIXTURES / "loha.expected.safetensors")

    merged.set_networks([(lora, Strength(1.0)), (loha, Strength(0.5))])
    changes = _changes(model, base)
    for path in answer_key.values():
        want = expected_lora[f"{path}.delta"].double() + expected_loha[f"{path}.delta@0.5"].double()
        assert _close(changes[f"{path}.weight"], want), path

    merged.set_networks([(loha, Strength(0.5))])
    changes = _changes(model, base)
    for path in answer_key.values():
        assert _close(changes[f"{path}.weight"], expected_loha[f"{path}.delta@0.5"]), path

    merged.set_networks([])
    state = model.state_dict()
    assert all(torch.equal(state[key], base[key]) for key in base)



def _in_dtype(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights cast to ``dtype`` (as the WebUI loads a checkpoint in fp16, or fp8), and those bits."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_same_prompt_gives_the_same_weights_whatever_was_generated_before():
    """An X/Y/Z strength sweep, another LoRA added and removed: in fp16 each change made by adding and subtracting
    would leave rounding residue, so the same <lora:…:0.5> would differ from one generation to the next."""
    model, merged, *_ = _load("lora")
    _in_dtype(model, torch.float16)
    lora, loha = read_network(FIXTURES / "lora.safetensors"), read_network(FIXTURES / "loha.safetensors")
    merged.set_networks([(lora, Strength(0.5))])
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    for strength in [1.0, 0.7, -1.0, 2.0, 3.3, 0.1, 1.7] * 3:
        merged.set_networks([(lora, Strength(strength)), (loha, Strength(strength))])
        merged.set_networks([(lora, Strength(strength))])
    merged.set_networks([(loha, Strength(0.5)), (lora, Strength(0.5))])  # the order tags are written in: no matter
    merged.set_networks([(lora, Strength(0.5))])
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())


def test_a_network_named_twice_applies_twice_as_in_the_webui():
    model, merged, expected, base, answer_key = _load("lora")
    lora = read_network(FIXTURES / "lora.safetensors")
    merged.set_networks([(lora, Strength(0.5)), (lora, Strength(0.5))])
    changes = _changes(model, base)
    assert all(_close(changes[f"{path}.weight"], expected[f"{path}.delta"]) for path in answer_key.values())
    merged.set_networks([(lora, Strength(0.5))])
    changes = _changes(model, base)
    assert all(_close(changes[f"{path}.weight"], expected[f"{path}.delta@0.5"]) for path in answer_key.values())


@pytest.mark.parametrize("case", ["lora", "loha"])
def test_fp8_weights_as_the_webui_stores_them_take_a_network_and_come_back_bit_exactly(case):
    """The WebUI's "FP8 weight" setting keeps Linear/Conv2d weights in float8_e4m3fn, which has no arithmetic."""
    model, merged, expected, base, answer_key = _load(case)
    loaded = _in_dtype(model, torch.float8_e4m3fn)
    merged.set_networks([(read_network(FIXTURES / f"{case}.safetensors"), Strength(1.0))])
    state = model.state_dict()
    for path in answer_key.values():  # the sum, within float8's resolution (3 mantissa bits)
        want = loaded[f"{path}.weight"].float() + expected[f"{path}.delta"].float()
        assert ((state[f"{path}.weight"].float() - want).abs() <= want.abs() / 16 + 2**-9).all(), path
    assert not all(torch.equal(state[k].float(), loaded[k].float()) for k in loaded)
    merged.set_networks([])
    assert all(torch.equal(v.float(), loaded[k].float()) for k, v in model.state_dict().items())


# --- ΔW asked for at a strength directly: a layer's forward, `lora bake`, `lora merge` -------------------------------


@pytest.mark.parametrize("case", CASES)
def test_a_layers_delta_asked_for_at_half_strength_is_lycoris_own(case):
    """Merging scales ΔW(1) by the strength where an algorithm is linear in it; a network run as the layers' forward,
    `lora bake` and `lora merge` ask ``module_delta`` for the strength itself, which must give the same ΔW and Δb."""
    expected = load_file(FIXTURES / f"{case}.expected.safetensors")
    with safe_open(str(FIXTURES / f"{case}.expected.safetensors"), "pt") as handle:
        answer_key = json.loads(handle.metadata()["lora_name_to_module"])
    network = read_network(FIXTURES / f"{case}.safetensors")
    for name, path in answer_key.items():
        delta = module_delta(network.modules[name], expected[f"{path}.weight"], 0.5)
        assert _close(delta.weight.double(), expected[f"{path}.delta@0.5"]), path
        if f"{path}.delta_bias@0.5" in expected:
            assert _close(delta.bias.double(), expected[f"{path}.delta_bias@0.5"]), path


def test_a1111s_scale_key_replaces_alpha_over_rank():
    """The WebUI's optional ``<name>.scale`` (``calc_scale``): when present it is the scale, whatever alpha says."""
    up, down = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 4.0]])
    tensors = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)}
    weight = torch.empty(2, 2, device="meta")
    torch.testing.assert_close(module_delta(tensors, weight).weight, up @ down)  # α/r = 1
    torch.testing.assert_close(module_delta({**tensors, "scale": torch.tensor(0.25)}, weight).weight, 0.25 * up @ down)


def test_constrained_oft_clamps_the_rotation_generator_to_alpha_times_the_output_channels():
    """LyCORIS's diag-OFT stores ``alpha`` = constraint and clamps ‖Q‖ at constraint · out_dim: one 2×2 block with
    Q = [[0, q], [−q, 0]] turns W by the Cayley rotation (I + Q)(I − Q)⁻¹ = [[1 − q², 2q], [−2q, 1 − q²]] / (1 + q²)."""
    weight = torch.eye(2)
    blocks = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])  # Q = B − Bᵀ has norm √2, far above the constraint
    alpha = 0.01
    q = alpha * 2 / math.sqrt(2)  # ‖Q‖ scaled down to alpha · out_dim = 0.02
    rotation = torch.tensor([[1 - q * q, 2 * q], [-2 * q, 1 - q * q]]) / (1 + q * q)
    delta = module_delta({"oft_blocks": blocks, "alpha": torch.tensor(alpha)}, weight).weight
    torch.testing.assert_close(delta, rotation.T @ weight - weight)
