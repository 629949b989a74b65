"""LoRAs on SD2's and SDXL's OpenCLIP text encoder, as the WebUI holds it: open_clip's blocks whose attention is one
``nn.MultiheadAttention`` with a fused ``in_proj_weight`` [3C, C], while Kohya files name q_proj/k_proj/v_proj/out_proj
apart. The hook must change exactly the rows of each part, as our core merges them, and give the bits back after."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.models import checkpoint
from lora_trainer.networks.apply import MergedNetworks, Strength
from lora_trainer.networks.files import read_network
from lora_trainer.networks.spec import NetworkSpec
from lora_trainer.safe_io import read_safetensors_metadata, save_safetensors
from tests.webui.conftest import (assert_merged_like_the_core, assert_restored, core_merge, pixels, random_network,
                                  save_lora, txt2img, txt2img_watching_weights, use_checkpoint, webui_parameters)

# (checkpoint fixture, the OpenCLIP embedder in the WebUI's tree, its Kohya prefix, its name in our checkpoint)
LAYOUTS = {
    "sd2": ("sd2_checkpoint", "cond_stage_model.wrapped", "lora_te", "cond_stage_model.model."),
    "sdxl": ("sdxl_checkpoint", "conditioner.embedders.1.wrapped", "lora_te2", "conditioner.embedders.1.model."),
}


def _loaded(webui, request, version):
    path = request.getfixturevalue(LAYOUTS[version][0])
    use_checkpoint(webui, path)
    webui.shared.opts.data["lora_trainer_output_folder"] = str(path.parent / "loras")
    return path, checkpoint.load_checkpoint(path)  # our own model of the same file: what the core merges into


def _fused_attention(webui, version, layer=0):
    return webui.shared.sd_model.get_submodule(f"{LAYOUTS[version][1]}.model.transformer.resblocks.{layer}.attn")


@pytest.mark.parametrize("version", LAYOUTS)
def test_a_text_encoder_lora_changes_the_fused_rows_as_the_core_merges_it_changes_the_image_and_restores(webui, request, version):
    path, ours = _loaded(webui, request, version)
    _, _, kohya, prefix = LAYOUTS[version]
    assert type(_fused_attention(webui, version)) is torch.nn.MultiheadAttention  # the WebUI's module, not ours
    network = random_network(ours, NetworkSpec(dim=4, alpha=2), seed=11)
    lora = save_lora(network, path.parent / "loras" / f"{version}_te.safetensors", ours.config, lambda k: k.startswith(kohya + "_"))
    parts = {re.sub(r"^.*_layers_\d+_", "", name) for name in read_network(lora).modules}
    assert parts == {"self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"}

    before = webui_parameters(webui.shared.sd_model)
    _, base = txt2img(webui, "a red circle")
    with_lora, during = txt2img_watching_weights(webui, f"a red circle <lora:{lora.stem}:0.8>")
    want = core_merge(ours, read_network(lora), Strength(0.8))
    assert_merged_like_the_core(during, want, version)

    width = ours.config.text_encoders[-1].config.width
    fused = f"{prefix}transformer.resblocks.0.attn.in_proj_weight"
    for part, rows in zip("qkv", range(3)):  # q, k and v rows each got their own module's change
        block = slice(rows * width, (rows + 1) * width)
        assert not torch.equal(during[fused][block], before[fused][block]), part
    for changed in ("attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
        assert not torch.equal(during[f"{prefix}transformer.resblocks.0.{changed}"], before[f"{prefix}transformer.resblocks.0.{changed}"])
    assert np.abs(pixels(with_lora) - pixels(base)).sum() > 0

    _, after = txt2img(webui, "a red circle")
    assert_restored(webui, before)
    assert np.array_equal(pixels(after), pixels(base))


@pytest.mark.parametrize("version", LAYOUTS)
def test_a_q_only_lora_changes_only_the_q_rows_of_the_fused_projection(webui, request, version):
    path, ours = _loaded(webui, request, version)
    _, _, kohya, prefix = LAYOUTS[version]
    network = random_network(ours, NetworkSpec(dim=4, alpha=4), seed=12)
    lora = save_lora(network, path.parent / "loras" / f"{version}_q.safetensors", ours.config,
                     lambda k: k.startswith(f"{kohya}_text_model_encoder_layers_0_self_attn_q_proj."))
    before = webui_parameters(webui.shared.sd_model)
    _, during = txt2img_watching_weights(webui, f"a red circle <lora:{lora.stem}:1>")

    width = ours.config.text_encoders[-1].config.width
    fused, bias = (f"{prefix}transformer.resblocks.0.attn.in_proj_{kind}" for kind in ("weight", "bias"))
    want = core_merge(ours, read_network(lora), Strength(1.0))
    assert torch.allclose(during[fused][:width], want[fused][:width], rtol=1e-5, atol=1e-6)
    assert not torch.equal(during[fused][:width], before[fused][:width])
    assert torch.equal(during[fused][width:], before[fused][width:])  # k and v rows keep their bits
    assert torch.equal(during[bias], before[bias])
    changed = {k for k in before if not torch.equal(during[k], before[k])}
    assert changed == {fused}


@pytest.mark.parametrize("version", LAYOUTS)
def test_the_webui_layout_encoder_computes_what_our_encoder_computes_after_the_same_merge(webui, request, version):
    """The stand-in's open_clip blocks (nn.MultiheadAttention) and our encoder agree, before and after a merge: what
    the WebUI-side check above sees is what generation uses."""
    path, ours = _loaded(webui, request, version)
    _, _, kohya, _ = LAYOUTS[version]
    network = random_network(ours, NetworkSpec(dim=4, alpha=2), seed=13)
    lora = save_lora(network, path.parent / "loras" / f"{version}_agree.safetensors", ours.config, lambda k: k.startswith(kohya + "_"))
    slot = ours.config.text_encoders[-1]
    ids = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(1))
    webui_encoder = webui.shared.sd_model.stub_model.text_encoders[-1]
    assert type(webui_encoder).__name__ == "_SampledThroughTheWebUIModules"
    txt2img(webui, f"a red circle <lora:{lora.stem}:0.9>")  # merged now, until the next prompt
    merged = checkpoint.load_checkpoint(path)
    MergedNetworks.for_model(merged.config, merged.unet, merged.text_encoders).set_networks([(read_network(lora), Strength(0.9))])
    with torch.no_grad():
        got = webui_encoder(ids, skip_layers=slot.skip_layers, final_norm=slot.final_norm)
        want = merged.text_encoders[-1](ids, skip_layers=slot.skip_layers, final_norm=slot.final_norm)
        unmerged = ours.text_encoders[-1](ids, skip_layers=slot.skip_layers, final_norm=slot.final_norm)
    assert torch.allclose(got.hidden, want.hidden, atol=1e-5) and torch.allclose(got.pooled, want.pooled, atol=1e-5)
    assert not torch.allclose(got.hidden, unmerged.hidden, atol=1e-3)


def test_the_first_lora_after_loading_an_sd2_checkpoint_does_not_rerun_the_eps_or_v_test_forward(
        webui, sd2_checkpoint, tmp_path, monkeypatch):
    """A full-size SD2 file without a .yaml or metadata is told eps from v by running its UNet once (as the WebUI
    does when it loads it). The hook only needs layer names: it must not run that forward again at generation time."""
    stripped = tmp_path / "no metadata" / "sd2 as downloaded.safetensors"
    metadata_free = json.loads(read_safetensors_metadata(sd2_checkpoint)[checkpoint.ARCHITECTURE_METADATA_KEY])
    del metadata_free["prediction_type"]
    tensors = load_file(sd2_checkpoint)
    save_safetensors(tensors, stripped, {checkpoint.ARCHITECTURE_METADATA_KEY: json.dumps(metadata_free)})
    config = checkpoint.detect_architecture(checkpoint.open_tensors(stripped))[0]
    monkeypatch.setitem(checkpoint.FULL_SIZE, "sd2", config)  # this tiny file now counts as a full-size SD2 file
    forwards = []
    monkeypatch.setattr(checkpoint, "_responds_like_v_prediction", lambda source, config: forwards.append(source.path) or False)
    use_checkpoint(webui, stripped)
    assert len(forwards) == 1  # the WebUI's own load decided eps/v
    webui.shared.opts.data["lora_trainer_output_folder"] = str(tmp_path / "loras")
    ours = checkpoint.load_checkpoint(stripped)
    lora = save_lora(random_network(ours, NetworkSpec(dim=4, alpha=2), seed=14), tmp_path / "loras" / "sd2_any.safetensors", ours.config)
    forwards.clear()
    before = webui_parameters(webui.shared.sd_model)
    _, during = txt2img_watching_weights(webui, f"a red circle <lora:{lora.stem}:1>")
    assert forwards == []
    assert any(not torch.equal(during[k], before[k]) for k in before)
