"""The extension loaded the way the WebUI loads it, against the stand-in ``modules`` in tests/webui_stub."""

import copy
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lora_trainer.models import checkpoint
from lora_trainer.models.configs import SD2, SDXL
from lora_trainer.networks.apply import MergedNetworks, Strength
from lora_trainer.networks.network import base_metadata, create_network, save_network
from lora_trainer.networks.spec import NetworkSpec
from lora_trainer.safe_io import save_safetensors
from lora_trainer.tiny_model.build import TINY_MODEL_PATH

ROOT = Path(__file__).resolve().parents[2]
STUB = ROOT / "tests" / "webui_stub"
_OUR_WEBUI_MODULES = ("lora_trainer.webui.extension", "lora_trainer.webui.extra_network", "lora_trainer.webui.xyz_axes",
                      "lora_trainer.webui.host")


@pytest.fixture(scope="session")
def tiny_model():
    return checkpoint.load_checkpoint(TINY_MODEL_PATH)


@pytest.fixture(scope="session")
def lora_folder(tmp_path_factory, tiny_model):
    """LoRAs for the tiny model: a two-epoch run "cats", a file whose alias differs ("dogs"), one marked SDXL."""
    folder = tmp_path_factory.mktemp("Lora")
    config = tiny_model.config

    def make(file_name, seed, **metadata):
        network = create_network(config, tiny_model.unet, tiny_model.text_encoders, NetworkSpec(dim=4, alpha=4))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        save_network(network.state_dict(), folder / file_name, {**base_metadata(config, network.spec, file_name), **metadata}, "fp32")

    make("cats-000001.safetensors", 1, ss_output_name="cats", ss_epoch="1")
    make("cats.safetensors", 2, ss_output_name="cats", ss_epoch="2")
    make("renamed_file.safetensors", 3, ss_output_name="dogs", ss_epoch="1")
    make("xl_style.safetensors", 4, ss_output_name="xl_style", ss_base_model_version="sdxl_base_v1-0")
    return folder


_LOADED: dict[Path, object] = {}  # checkpoints the tests wrote, loaded once per session


def _memoised_loader(tiny_model):
    """Each checkpoint read once; every WebUI load gets its own copy (the tiny model from the session fixture)."""
    real = checkpoint.load_checkpoint

    def load(path, **kwargs):
        path = Path(path).resolve()
        if path == TINY_MODEL_PATH.resolve():
            return copy.deepcopy(tiny_model)
        if path not in _LOADED:
            _LOADED[path] = real(path, **kwargs)
        return copy.deepcopy(_LOADED[path])

    return load


def _forget_modules():
    for name in [n for n in sys.modules if n in ("modules", "xyz_grid.py", "lora_trainer.py") or n.startswith("modules.")]:
        del sys.modules[name]
    for name in _OUR_WEBUI_MODULES:
        sys.modules.pop(name, None)


def load_by_path(name: str, path: Path):
    """As modules/script_loading.load_module: the module is named after the file and not put in sys.modules."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def webui_modules(tmp_path, monkeypatch, tiny_model, lora_folder):
    """The stand-in WebUI before any extension script is loaded (X/Y/Z plot loaded, tiny model listed)."""
    _forget_modules()
    monkeypatch.setenv("WEBUI_STUB_ROOT", str(tmp_path / "webui"))
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(STUB))
    monkeypatch.setattr(checkpoint, "load_checkpoint", _memoised_loader(tiny_model))
    from modules import call_queue, extra_networks, processing, script_callbacks, scripts, sd_models, shared

    shared.cmd_opts.lora_dir = str(lora_folder)
    xyz_path = STUB / "scripts" / "xyz_grid.py"
    xyz = load_by_path("xyz_grid.py", xyz_path)
    scripts.scripts_data.append(scripts.ScriptClassData(xyz.Script, str(xyz_path), str(STUB), xyz))
    sd_models.list_models()
    yield SimpleNamespace(shared=shared, script_callbacks=script_callbacks, extra_networks=extra_networks,
                          processing=processing, sd_models=sd_models, scripts=scripts, xyz=xyz, call_queue=call_queue)
    script_callbacks.script_unloaded_callback()
    _forget_modules()


@pytest.fixture
def load_extension(webui_modules):
    """Loads scripts/lora_trainer.py as the WebUI does, then runs before_ui; returns the stand-in namespace."""

    def load(before_ui: bool = True):
        webui_modules.script = load_by_path("lora_trainer.py", ROOT / "scripts" / "lora_trainer.py")
        if before_ui:
            webui_modules.script_callbacks.before_ui_callback()
        return webui_modules

    return load


@pytest.fixture
def webui(load_extension):
    """The extension loaded and a model loaded, as after the WebUI's start-up."""
    w = load_extension()
    w.sd_models.load_model()
    return w


def txt2img(w, prompt: str, seed: int = 3, size: int = 64):
    p = w.processing.StableDiffusionProcessingTxt2Img(prompt=prompt, seed=seed, steps=1, width=size, height=size,
                                                      sampler_name="Euler", cfg_scale=5, do_not_save_samples=True)
    return p, w.processing.process_images(p)


def use_checkpoint(w, path: Path):
    """The WebUI switched to the checkpoint file ``path`` (listed from --ckpt-dir, as the checkpoint dropdown does)."""
    w.shared.cmd_opts.ckpt_dir = str(path.parent)
    w.sd_models.list_models()
    info = next(i for i in w.sd_models.checkpoints_list.values() if Path(i.filename) == path)
    w.shared.opts.data["sd_model_checkpoint"] = info.title
    return w.sd_models.reload_model_weights(info=info)


def webui_parameters(sd_model) -> dict[str, torch.Tensor]:
    """The WebUI model's parameters by checkpoint name (the prompt hijack's ``.wrapped`` left out), copied."""
    return {k.replace(".wrapped", ""): v.detach().clone() for k, v in sd_model.named_parameters()}


def txt2img_watching_weights(w, prompt: str, seed: int = 3, size: int = 64):
    """txt2img, and the WebUI model's parameters as the UNet saw them on its first call (during generation)."""
    seen = {}
    model = w.shared.sd_model

    def snapshot(module, args):
        if not seen:
            seen.update(webui_parameters(model))

    handle = model.model.diffusion_model.register_forward_pre_hook(snapshot)
    try:
        _, processed = txt2img(w, prompt, seed, size)
    finally:
        handle.remove()
    assert seen, "the UNet never ran"
    return processed, seen


def pixels(processed):
    return np.asarray(processed.images[0], dtype=np.int16)


def core_merge(model, network, strength: Strength) -> dict[str, torch.Tensor]:
    """What our merging core makes of ``model`` (a copy) with ``network``: parameters by checkpoint name."""
    model = copy.deepcopy(model)
    config = model.config
    MergedNetworks.for_model(config, model.unet, model.text_encoders).set_networks([(network, strength)])
    parts = [(config.unet_prefix, model.unet)] + [(slot.prefix, te) for slot, te in zip(config.text_encoders, model.text_encoders)]
    return {prefix + name: p.detach().clone() for prefix, module in parts for name, p in module.named_parameters()}


def assert_merged_like_the_core(during: dict, want: dict, label) -> int:
    """Every parameter LoRAs may change equals the core's; returns how many differ from the checkpoint."""
    for name, value in want.items():
        assert torch.allclose(during[name].float(), value.float(), rtol=1e-5, atol=1e-6), (label, name)
    return len(want)


def assert_restored(w, before: dict) -> None:
    after = webui_parameters(w.shared.sd_model)
    assert all(torch.equal(after[k], v) for k, v in before.items()), "weights not restored bit-exactly"


# --- tiny SD2 and SDXL checkpoints at the tiny model's widths ----------------------------------------------------


def tiny_sd2_config(tiny):
    """SD2's layout (OpenCLIP text encoder, penultimate layer; linear transformer projections) at toy widths."""
    slot = SD2.text_encoders[0]
    encoder = dataclasses.replace(slot.config, width=32, layers=2, heads=2, mlp_width=64, projection_dim=32)
    unet = dataclasses.replace(tiny.unet, use_linear_projection=True, context_dim=32)
    return dataclasses.replace(SD2, unet=unet, text_encoders=(dataclasses.replace(slot, config=encoder, kohya_layers=1),),
                               vae=tiny.vae, resolution=64)


def tiny_sdxl_config(tiny):
    """SDXL's layout (CLIP-L + OpenCLIP-bigG, size conditioning, three levels with attention on the last two, which
    gives SDXL's block-weight blocks IN04…OUT05) at toy widths."""
    te1, te2 = SDXL.text_encoders
    clip_l = dataclasses.replace(te1.config, width=32, layers=2, heads=2, mlp_width=64)
    big_g = dataclasses.replace(te2.config, width=32, layers=2, heads=2, mlp_width=64, projection_dim=32)
    unet = dataclasses.replace(SDXL.unet, model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 1),
                               transformer_depth_middle=1, num_heads=4, head_dim=None, context_dim=64,
                               adm_in_channels=32 + 6 * 256)
    return dataclasses.replace(SDXL, unet=unet, text_encoders=(dataclasses.replace(te1, config=clip_l),
                                                              dataclasses.replace(te2, config=big_g)),
                               vae=tiny.vae, resolution=64)


def write_checkpoint(path: Path, config, vae, seed: int = 0) -> Path:
    """A single-file checkpoint of ``config`` with random weights (seeded) and the given VAE."""
    torch.manual_seed(seed)
    unet, text_encoders, _ = checkpoint.build_models(config, device="cpu")
    state = {config.unet_prefix + k: v for k, v in unet.state_dict().items()}
    state |= {slot.prefix + k: v for slot, te in zip(config.text_encoders, text_encoders) for k, v in te.state_dict().items()}
    state |= {config.vae_prefix + k: v for k, v in vae.state_dict().items()}
    metadata = {checkpoint.ARCHITECTURE_METADATA_KEY: json.dumps(checkpoint.architecture_overrides(config))}
    return save_safetensors(state, path, metadata)


@pytest.fixture(scope="session")
def sd2_checkpoint(tmp_path_factory, tiny_model) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("sd2") / "tiny sd2.safetensors", tiny_sd2_config(tiny_model.config), tiny_model.vae)


@pytest.fixture(scope="session")
def sdxl_checkpoint(tmp_path_factory, tiny_model) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny sdxl.safetensors", tiny_sdxl_config(tiny_model.config), tiny_model.vae)


def random_network(model, spec, seed: int = 7, scale: float = 0.3):
    """A network of ``spec`` for ``model`` whose every tensor is random (a trained file, not a fresh one)."""
    network = create_network(model.config, model.unet, model.text_encoders, spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return network


def save_lora(network, path: Path, config, keep=lambda key: True) -> Path:
    """The network's file (only the keys ``keep`` accepts), with sd-scripts' metadata for ``config``."""
    state = {k: v for k, v in network.state_dict().items() if keep(k)}
    save_network(state, path, base_metadata(config, network.spec, path.stem), "fp32")
    return path
