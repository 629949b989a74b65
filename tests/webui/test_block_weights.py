"""``lbw=`` block weights through the WebUI hook on a tiny SDXL checkpoint (SDXL's 12 blocks: BASE, IN04, IN05, IN07,
IN08, M00, OUT00–OUT05): a block weighted 0 keeps the checkpoint's bits while the others get the LoRA, for vectors and
for presets, which take the loaded model's block count."""

import pytest
import torch

from lora_trainer.models import checkpoint
from lora_trainer.networks.apply import Strength
from lora_trainer.networks.block_weights import SDXL_SCHEME, parse_block_weights
from lora_trainer.networks.files import read_network
from lora_trainer.networks.spec import NetworkSpec
from tests.webui.conftest import (assert_merged_like_the_core, assert_restored, core_merge, random_network, save_lora, txt2img,
                                  txt2img_watching_weights, use_checkpoint, webui_parameters)

UNET = "model.diffusion_model."
TEXT = ("conditioner.embedders.0.", "conditioner.embedders.1.")
SDXL_BLOCKS = {"IN04": "input_blocks.4.", "IN05": "input_blocks.5.", "IN07": "input_blocks.7.", "IN08": "input_blocks.8.",
               "M00": "middle_block.", **{f"OUT{i:02d}": f"output_blocks.{i}." for i in range(6)}}


@pytest.fixture
def sdxl_webui(webui, sdxl_checkpoint):
    use_checkpoint(webui, sdxl_checkpoint)
    webui.shared.opts.data["lora_trainer_output_folder"] = str(sdxl_checkpoint.parent / "loras")
    model = checkpoint.load_checkpoint(sdxl_checkpoint)
    network = random_network(model, NetworkSpec(dim=4, alpha=4), seed=21)
    lora = save_lora(network, sdxl_checkpoint.parent / "loras" / "xl_blocks.safetensors", model.config)
    return webui, model, lora


def changed_blocks(before, during) -> set[str]:
    changed = {k for k in before if not torch.equal(before[k], during[k])}
    blocks = {label for label, path in SDXL_BLOCKS.items() if any(k.startswith(UNET + path) for k in changed)}
    return blocks | ({"BASE"} if any(k.startswith(TEXT) for k in changed) else set())


@pytest.mark.parametrize("off", ["IN07", "M00", "OUT03", "BASE"])
def test_a_block_weighted_zero_keeps_its_weights_while_the_others_get_the_lora(sdxl_webui, off):
    webui, model, lora = sdxl_webui
    vector = ",".join("0" if block == off else "1" for block in SDXL_SCHEME.blocks)
    before = webui_parameters(webui.shared.sd_model)
    _, during = txt2img_watching_weights(webui, f"a red circle <lora:{lora.stem}:0.9:lbw={vector}>")
    assert webui.extra_networks.extra_network_registry["lora"].warnings == []
    assert changed_blocks(before, during) == set(SDXL_SCHEME.blocks) - {off}
    want = core_merge(model, read_network(lora), Strength(0.9, blocks=parse_block_weights(vector, model.config.unet)))
    assert_merged_like_the_core(during, want, off)
    txt2img(webui, "a red circle")
    assert_restored(webui, before)


def test_a_preset_on_sdxl_takes_sdxls_blocks(sdxl_webui):
    webui, model, lora = sdxl_webui
    before = webui_parameters(webui.shared.sd_model)
    _, during = txt2img_watching_weights(webui, f"a red circle <lora:{lora.stem}:1:lbw=OUTD>")
    assert webui.extra_networks.extra_network_registry["lora"].warnings == []
    assert changed_blocks(before, during) == {"BASE", "OUT00", "OUT01", "OUT02", "OUT03"}
    _, during = txt2img_watching_weights(webui, f"a red circle <lora:{lora.stem}:1:lbw=ALL>")
    assert changed_blocks(before, during) == set(SDXL_SCHEME.blocks)


def test_an_sd1_length_vector_on_sdxl_is_skipped_with_a_message_and_generation_goes_on(sdxl_webui):
    webui, _, lora = sdxl_webui
    before = webui_parameters(webui.shared.sd_model)
    _, during = txt2img_watching_weights(webui, f"a red circle <lora:{lora.stem}:1:lbw={','.join(['1'] * 17)}>")
    assert changed_blocks(before, during) == set()
    warnings = webui.extra_networks.extra_network_registry["lora"].warnings
    assert len(warnings) == 1 and "17 values" in warnings[0] and "this model takes 12" in warnings[0]
