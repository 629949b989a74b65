"""Every format the trainer writes goes through the WebUI hook to the same weights our merging core computes (which
the LyCORIS fixtures pin to LyCORIS's own numbers, tests/test_network_fixtures.py)."""

import copy

import pytest
import torch

from lora_trainer.networks.apply import MergedNetworks, Strength
from lora_trainer.networks.files import read_network
from lora_trainer.networks.network import base_metadata, create_network, save_network
from lora_trainer.networks.spec import NetworkSpec
from tests.webui.conftest import txt2img

SPECS = {
    "locon": NetworkSpec(dim=4, alpha=2, conv_dim=2, conv_alpha=1),
    "loha": NetworkSpec(algorithm="loha", dim=2, alpha=1, conv_dim=2),
    "lokr": NetworkSpec(algorithm="lokr", dim=2, alpha=1, conv_dim=2, factor=4),
    "dora": NetworkSpec(dim=4, alpha=2, dora=True),
}


@pytest.mark.parametrize("kind", SPECS)
def test_the_hook_merges_each_format_to_what_the_core_computes(webui, tiny_model, lora_folder, kind):
    config = tiny_model.config
    network = create_network(config, tiny_model.unet, tiny_model.text_encoders, SPECS[kind])
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    path = lora_folder / f"format_{kind}.safetensors"
    save_network(network.state_dict(), path, base_metadata(config, network.spec, path.stem), "fp32")
    saved = read_network(path)
    try:
        txt2img(webui, f"a red circle <lora:format_{kind}:0.7:0.4>")  # the hook leaves the weights merged until the next prompt
    finally:
        path.unlink()  # the folder is shared by the session's tests, which list it
    # the prompt hijack wraps the text encoder (cond_stage_model.wrapped.…), as in the WebUI
    merged_by_hook = {k.replace(".wrapped", ""): v for k, v in webui.shared.sd_model.state_dict().items()}

    reference = copy.deepcopy(tiny_model)
    core = MergedNetworks.for_model(config, reference.unet, reference.text_encoders)
    core.set_networks([(saved, Strength(0.7, 0.4))])
    parts = [(config.unet_prefix, reference.unet)] + [(slot.prefix, encoder) for slot, encoder in
                                                       zip(config.text_encoders, reference.text_encoders)]
    changed = 0
    for prefix, module in parts:
        for name, want in module.named_parameters():  # what LoRAs change (buffers are not theirs)
            got = merged_by_hook[prefix + name]
            assert torch.allclose(got.float(), want.float(), rtol=1e-5, atol=1e-6), (kind, prefix + name)
            changed += int(prefix == config.unet_prefix and not torch.equal(want, tiny_model.unet.get_parameter(name)))
    assert changed > 0  # the LoRA did change the UNet
