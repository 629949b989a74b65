"""Loading checkpoints: detection, precision, EMA, separate VAEs, Diffusers folders, eps/v, and bad files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from reference import TINY_KOHYA_CHECKPOINT, reference_keys

from lora_trainer.errors import UserError
from lora_trainer.models.checkpoint import (
    ARCHITECTURE_METADATA_KEY,
    TensorSource,
    architecture_overrides,
    build_models,
    detect_architecture,
    load_checkpoint,
)
from lora_trainer.models.configs import SD1, SD2, SD2_V, SDXL
from lora_trainer.safe_io import save_safetensors
from lora_trainer.tiny_model.build import tiny_config


def source_from_reference(name: str) -> TensorSource:
    shapes = reference_keys(name)
    return TensorSource(Path(name), shapes, {k: torch.float16 for k in shapes}, None, {})


def source_from_config(config) -> TensorSource:
    shapes = {}
    for prefix, module in model_parts(config, *build_models(config)):
        shapes.update({prefix + k: tuple(v.shape) for k, v in module.state_dict().items()})
    return TensorSource(Path(config.name), shapes, {k: torch.float16 for k in shapes}, None, {})


def model_parts(config, unet, text_encoders, vae):
    parts = [(config.unet_prefix, unet), (config.vae_prefix, vae)]
    return parts + [(slot.prefix, te) for slot, te in zip(config.text_encoders, text_encoders)]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (lambda: source_from_reference("sd15-checkpoint-keys.txt"), SD1),
        (lambda: source_from_reference("sdxl-checkpoint-keys.txt"), SDXL),
        (lambda: source_from_config(SD2), SD2),
    ],
    ids=["sd15", "sdxl", "sd2"],
)
def test_full_size_files_are_detected_with_their_exact_config(source, expected):
    config, reason = detect_architecture(source())
    assert config == expected
    assert "full-size" in reason


def tiny_state(config, seed=0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    unet, text_encoders, vae = build_models(config, device="cpu")
    state = {}
    for prefix, module in model_parts(config, unet, text_encoders, vae):
        for key, value in module.state_dict().items():
            state[prefix + key] = value.to(dtype) if value.is_floating_point() else value
    return state


def write_tiny(path: Path, config=None, dtype=torch.float32, drop=(), metadata=None, state=None) -> Path:
    config = config or tiny_config(scaling_factor=0.5)
    state = state if state is not None else tiny_state(config, dtype=dtype)
    state = {k: v for k, v in state.items() if not k.startswith(drop)} if drop else state
    meta = {ARCHITECTURE_METADATA_KEY: json.dumps(architecture_overrides(config)), **(metadata or {})}
    return save_safetensors(state, path, meta)


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("target", [torch.float32, torch.float16])
def test_any_file_precision_loads_into_the_requested_precision(tmp_path, file_dtype, target):
    path = write_tiny(tmp_path / "m.safetensors", dtype=file_dtype)
    model = load_checkpoint(path, dtype=target)
    assert model.config.label == "SD1" and model.config.resolution == 64
    for module in model.modules():
        assert {p.dtype for p in module.parameters()} == {target}
    ids = model.text_encoders[0].text_model.embeddings.position_ids
    assert ids.dtype == torch.int64 and ids[0, -1].item() == 76


def test_tiny_model_config_round_trips_through_metadata(tmp_path):
    config = tiny_config(scaling_factor=0.77)
    model = load_checkpoint(write_tiny(tmp_path / "m.safetensors", config=config))
    assert model.config == config


def test_kohya_tiny_checkpoint_loads_and_runs():
    """sd-scripts' own tiny SD1 file (fp16, with DDPM buffers and position_ids) loads and produces an image."""
    widths = json.loads((TINY_KOHYA_CHECKPOINT.parent / "tiny_sd15_config.json").read_text())
    overrides = {"unet": {"num_heads": widths["unet_num_heads"]}, "text_encoders": [{"heads": widths["te_heads"]}]}
    model = load_checkpoint(TINY_KOHYA_CHECKPOINT, overrides=overrides)
    assert model.config.unet.channel_mult == tuple(widths["unet_channel_mult"])
    assert model.config.vae.channel_mult == tuple(widths["vae_ch_mult"])
    assert model.config.text_encoders[0].config.layers == widths["te_layers"]
    from lora_trainer.sampling.txt2img import GenerationSettings, txt2img

    image = txt2img(model, GenerationSettings("shapes, red circle", steps=3, seed=1, width=64, height=64))[0].image
    assert image.size == (64, 64)


def test_ema_only_files_load_their_ema_weights(tmp_path):
    # EMA names have no dots; they are matched against SD1/SD2/SDXL's own topology, so use SD1's channel pattern
    base = tiny_config(scaling_factor=0.5)
    config = dataclasses.replace(base, unet=dataclasses.replace(base.unet, channel_mult=(1, 2, 4, 4)))
    state = tiny_state(config)
    ema = {}
    for key in list(state):
        if key.startswith("model.diffusion_model."):
            ema["model_ema.diffusion_model" + key[len("model.diffusion_model."):].replace(".", "")] = state.pop(key)
    model = load_checkpoint(write_tiny(tmp_path / "ema.safetensors", config=config, state=state | ema))
    expected = tiny_state(config)["model.diffusion_model.out.2.weight"]
    assert torch.equal(model.unet.out[2].weight, expected)
    assert any("EMA" in note for note in model.notes)


def test_use_ema_picks_the_ema_copy_when_both_are_present(tmp_path):
    config = tiny_config(scaling_factor=0.5)
    state = tiny_state(config)
    ema = {"model_ema.diffusion_model" + k[len("model.diffusion_model."):].replace(".", ""): v + 1
           for k, v in state.items() if k.startswith("model.diffusion_model.")}
    path = write_tiny(tmp_path / "both.safetensors", config=config, state=state | ema)
    regular = load_checkpoint(path)
    with_ema = load_checkpoint(path, use_ema=True)
    assert torch.equal(regular.unet.out[2].bias, state["model.diffusion_model.out.2.bias"])
    assert torch.equal(with_ema.unet.out[2].bias, state["model.diffusion_model.out.2.bias"] + 1)


@pytest.mark.parametrize("vae_layout", ["prefixed", "bare", "diffusers"])
def test_a_file_without_vae_takes_a_separate_vae_file(tmp_path, vae_layout):
    config = tiny_config(scaling_factor=0.5)
    state = tiny_state(config, seed=3)
    path = write_tiny(tmp_path / "novae.safetensors", config=config, state=state, drop=("first_stage_model.",))
    without = load_checkpoint(path)
    assert without.vae is None and any("--vae" in note for note in without.notes)

    vae_state = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    if vae_layout == "prefixed":
        vae_file = {"first_stage_model." + k: v for k, v in vae_state.items()}
    elif vae_layout == "bare":
        vae_file = vae_state
    else:
        vae_file = to_diffusers_vae(vae_state)
    save_safetensors(vae_file, tmp_path / "my.vae.safetensors")
    model = load_checkpoint(path, vae_path=tmp_path / "my.vae.safetensors")
    for key, value in model.vae.state_dict().items():
        assert torch.equal(value, vae_state[key]), key


def to_diffusers_vae(ldm_state):
    """Invert vae_from_diffusers by matching converted names (test helper; the package only reads diffusers)."""
    from diffusers import AutoencoderKL as DiffusersVAE

    from lora_trainer.models.vae import vae_from_diffusers

    config = tiny_config(scaling_factor=0.5).vae
    reference = DiffusersVAE(
        block_out_channels=[config.base_channels * m for m in config.channel_mult],
        down_block_types=["DownEncoderBlock2D"] * len(config.channel_mult),
        up_block_types=["UpDecoderBlock2D"] * len(config.channel_mult),
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=config.norm_groups,
    )
    # tag every diffusers tensor with its index, convert the whole dict, and read the tags back
    keys = list(reference.state_dict())
    shapes = {key: value.shape for key, value in reference.state_dict().items()}
    tagged = vae_from_diffusers({key: torch.full(shapes[key], float(i)) for i, key in enumerate(keys)})
    names = {ours: keys[int(value.flatten()[0])] for ours, value in tagged.items()}
    return {names[k]: v.reshape(shapes[names[k]]) for k, v in ldm_state.items()}


# --- eps / v -----------------------------------------------------------------------------------------------


def test_prediction_type_comes_from_a_yaml_beside_the_file(tmp_path):
    path = write_tiny(tmp_path / "m.safetensors")
    assert load_checkpoint(path).config.prediction_type == "epsilon"
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "v"\n', encoding="utf-8")
    config = load_checkpoint(path).config
    assert config.prediction_type == "v_prediction" and config.label == "SD1-v"


def test_prediction_type_comes_from_metadata_and_the_user_overrides_it(tmp_path):
    for metadata in ({"modelspec.prediction_type": "v"}, {"ss_v_parameterization": "True"}):
        path = write_tiny(tmp_path / "m.safetensors", metadata=metadata)
        assert load_checkpoint(path).config.prediction_type == "v_prediction"
    assert load_checkpoint(path, prediction_type="epsilon").config.prediction_type == "epsilon"


def test_sd2_eps_or_v_is_decided_by_a_test_forward_like_the_webui(monkeypatch):
    """The WebUI's rule on a full-size SD2 UNet: (out - x).mean() < -1 at t=999 means v-prediction."""
    from lora_trainer.models import checkpoint

    calls = []

    def fake_forward(source, config):
        calls.append(config.name)
        return True

    monkeypatch.setattr(checkpoint, "_responds_like_v_prediction", fake_forward)
    source = source_from_config(SD2)
    config, _, notes, _ = checkpoint.identify(source, Path("/nonexistent/model.safetensors"))
    assert config == SD2_V and calls == ["sd2"] and any("test forward" in n for n in notes)


def test_the_v_test_forward_itself_tells_v_from_eps():
    """A UNet whose output is -2·x (what a v-model gives at t=999 on this input) is v; one returning x is eps. The
    threshold is the WebUI's (sd_models_config.is_using_v_parameterization_for_sd2: (unet(x) - x).mean() < -1 with
    x = 0.5 everywhere): a UNet that outputs its final bias b gives b - 0.5, so -0.6 is v and -0.4 eps."""
    from lora_trainer.models import checkpoint

    # run the real function on a tiny SD2-shaped UNet whose final conv we control
    config = dataclasses.replace(SD2, unet=dataclasses.replace(tiny_config().unet, use_linear_projection=True, context_dim=1024,
                                                                num_heads=None, head_dim=16, norm_groups=8))
    from lora_trainer.models.unet import UNetModel

    for bias, expected in ((-3.0, True), (1.0, False), (-0.6, True), (-0.4, False)):
        torch.manual_seed(0)
        unet = UNetModel(config.unet)
        with torch.no_grad():
            unet.out[2].weight.zero_()
            unet.out[2].bias.fill_(bias)
        state = {config.unet_prefix + k: v for k, v in unet.state_dict().items()}
        assert checkpoint._responds_like_v_prediction(TensorSource.from_dict(Path("x"), state), config) is expected


# --- Diffusers folders -------------------------------------------------------------------------------------


def test_a_diffusers_folder_loads_and_computes_like_diffusers(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
    )
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                        vocab_size=49408, max_position_embeddings=77, eos_token_id=49407))
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, scaling_factor=0.3)
    folder = tmp_path / "my model (diffusers)"
    unet.save_pretrained(folder / "unet")
    text.save_pretrained(folder / "text_encoder")
    vae.save_pretrained(folder / "vae")
    DDIMScheduler(prediction_type="v_prediction").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text("{}", encoding="utf-8")

    model = load_checkpoint(folder)
    assert model.config.prediction_type == "v_prediction"
    assert model.vae.config.scaling_factor == pytest.approx(0.3)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = unet(x, torch.tensor([10.0]), encoder_hidden_states=context).sample
        got = model.unet(x, torch.tensor([10.0]), context)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
        ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
        assert torch.allclose(model.text_encoders[0](ids).hidden, text(ids).last_hidden_state, atol=1e-5)


def test_an_sd2_diffusers_folder_uses_its_truncated_openclip_encoder_as_is(tmp_path):
    """Diffusers drops OpenCLIP's last layer and projection for SD2; its own last layer is SD2's penultimate one."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=1024,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True,
    )
    text = CLIPTextModel(CLIPTextConfig(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, intermediate_size=64,
                                        vocab_size=1000, max_position_embeddings=77, hidden_act="gelu", eos_token_id=999))
    folder = tmp_path / "sd2"
    unet.save_pretrained(folder / "unet")
    text.save_pretrained(folder / "text_encoder")
    model = load_checkpoint(folder)
    slot = model.config.text_encoders[0]
    assert model.config.name.startswith("sd2") and slot.config.layout == "open_clip"
    assert slot.skip_layers == 0 and slot.final_norm and slot.config.projection_dim is None and slot.config.layers == 2
    ids = torch.tensor([[998, 5, 6, 999] + [0] * 73])
    with torch.no_grad():
        ours = model.text_encoders[0](ids, skip_layers=slot.skip_layers, final_norm=slot.final_norm).hidden
        assert torch.allclose(ours, text(ids).last_hidden_state, atol=1e-5)


# --- bad files ---------------------------------------------------------------------------------------------


def expect_user_error(path, *fragments):
    with pytest.raises(UserError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message or path.name in message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    return message


def test_truncated_file(tmp_path):
    path = write_tiny(tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_user_error(path, "truncated", "download it again")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    expect_user_error(path, "empty")


def test_not_a_model_at_all(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my notes, not a model", encoding="utf-8")
    expect_user_error(path, "not a readable")


def test_missing_path_names_the_path(tmp_path):
    expect_user_error(tmp_path / "nowhere" / "模型 v1.safetensors", "no such file")


def test_a_lora_given_as_checkpoint_is_named_as_such(tmp_path):
    path = save_safetensors({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
                            tmp_path / "my_lora.safetensors")
    expect_user_error(path, "LoRA", "models/Lora")


def test_sd3_and_flux_are_refused_by_name(tmp_path):
    sd3 = save_safetensors({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2, 2)}, tmp_path / "sd3.safetensors")
    flux = save_safetensors({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, tmp_path / "flux1-dev.safetensors")
    expect_user_error(sd3, "Stable Diffusion 3")
    expect_user_error(flux, "Flux")


class NotATensor:
    pass


def test_ckpt_that_needs_unsafe_unpickling_is_refused_without_running_it(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": NotATensor()}, path)
    expect_user_error(path, "unsafe unpickling", ".safetensors")


def test_a_ckpt_that_is_no_pickle_at_all_is_called_damaged_not_unsafe(tmp_path):
    """Random bytes (a broken download, an HTML page saved as .ckpt) are no security question: say what they are."""
    path = tmp_path / "download.ckpt"
    path.write_bytes(b"<!DOCTYPE html><html>Too many requests</html>" * 50)
    expect_user_error(path, "is not a checkpoint: neither the zip nor the pickle a .ckpt/.pt is", "download it again")
    legacy = tmp_path / "legacy.ckpt"  # torch's pre-1.6 format: a bare pickle, still read
    torch.save({"state_dict": {"x": torch.ones(1)}}, legacy, _use_new_zipfile_serialization=False)
    from lora_trainer.models.checkpoint import open_tensors

    assert open_tensors(legacy).shapes == {"x": (1,)}


def test_plain_ckpt_with_a_state_dict_loads(tmp_path, monkeypatch):
    config = tiny_config(scaling_factor=0.5)
    state = tiny_state(config)
    path = tmp_path / "模型 v1.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, path)
    load = torch.load

    def load_as_torch_2_1_does(f, *args, mmap=None, **kwargs):  # the WebUI's torch maps a file by its name only
        if mmap and not isinstance(f, str):
            raise ValueError("f must be a string filename in order to use mmap argument")
        return load(f, *args, mmap=mmap, **kwargs)

    monkeypatch.setattr(torch, "load", load_as_torch_2_1_does)
    model = load_checkpoint(path, overrides=architecture_overrides(config))
    assert torch.equal(model.unet.out[2].weight, state["model.diffusion_model.out.2.weight"])


def test_wrong_shapes_name_the_tensor(tmp_path):
    config = tiny_config(scaling_factor=0.5)
    state = tiny_state(config)
    state["first_stage_model.quant_conv.weight"] = torch.zeros(3, 3, 1, 1)
    path = write_tiny(tmp_path / "odd.safetensors", config=config, state=state)
    expect_user_error(path, "first_stage_model.quant_conv.weight")
