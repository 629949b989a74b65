"""Text encoders: full-size layouts equal the real checkpoints', and tiny configs compute what transformers computes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference import TINY_KOHYA_CHECKPOINT, keys_under, shapes_of

from lora_trainer.models.text_encoders import (
    CLIP_VIT_L,
    LOGIT_SCALE_INIT,
    OPENCLIP_VIT_BIGG,
    OPENCLIP_VIT_H,
    CLIPTextModel,
    OpenCLIPTextModel,
    TextEncoderConfig,
    build_text_encoder,
    first_eos_positions,
    text_encoder_from_transformers,
    text_encoder_to_transformers,
)

BOS, EOS = 49406, 49407


def meta_encoder(config: TextEncoderConfig):
    with torch.device("meta"):
        return build_text_encoder(config)


# --- full-size layouts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "reference", "prefix"),
    [
        (CLIP_VIT_L, "sd15-checkpoint-keys.txt", "cond_stage_model.transformer."),
        (CLIP_VIT_L, "sdxl-checkpoint-keys.txt", "conditioner.embedders.0.transformer."),
        (OPENCLIP_VIT_BIGG, "sdxl-checkpoint-keys.txt", "conditioner.embedders.1.model."),
    ],
    ids=["sd1", "sdxl-te1", "sdxl-te2"],
)
def test_full_size_text_encoder_has_the_checkpoint_layout(config, reference, prefix):
    model = meta_encoder(config)
    assert shapes_of(model) == keys_under(reference, prefix)
    if config.layout == "hf_clip":
        assert model.state_dict()["text_model.embeddings.position_ids"].dtype == torch.int64


# SD2's text encoder, from the original configuration: v2-inference(-v).yaml builds FrozenOpenCLIPEmbedder with
# arch "ViT-H-14", which creates open_clip's CLIP from model_configs/ViT-H-14.json and deletes `.visual`; the
# checkpoint stores the rest under cond_stage_model.model. These are that file's embed_dim and text_cfg
# (mlp_ratio keeps open_clip's default of 4). ViT-bigG-14.json is given too, to check the generator on SDXL's file.
VIT_H_14 = dict(embed_dim=1024, context_length=77, vocab_size=49408, width=1024, heads=16, layers=24)
VIT_BIGG_14 = dict(embed_dim=1280, context_length=77, vocab_size=49408, width=1280, heads=20, layers=32)


def open_clip_text_keys(embed_dim, context_length, vocab_size, width, heads, layers, mlp_ratio=4) -> dict:
    """Names and shapes of open_clip's CLIP text tower (its ``attn_mask`` buffer is not persistent)."""
    keys = {
        "token_embedding.weight": (vocab_size, width),
        "positional_embedding": (context_length, width),
        "ln_final.weight": (width,),
        "ln_final.bias": (width,),
        "text_projection": (width, embed_dim),
        "logit_scale": (),
    }
    mlp = width * mlp_ratio
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        keys |= {
            block + "ln_1.weight": (width,),
            block + "ln_1.bias": (width,),
            block + "attn.in_proj_weight": (3 * width, width),
            block + "attn.in_proj_bias": (3 * width,),
            block + "attn.out_proj.weight": (width, width),
            block + "attn.out_proj.bias": (width,),
            block + "ln_2.weight": (width,),
            block + "ln_2.bias": (width,),
            block + "mlp.c_fc.weight": (mlp, width),
            block + "mlp.c_fc.bias": (mlp,),
            block + "mlp.c_proj.weight": (width, mlp),
            block + "mlp.c_proj.bias": (width,),
        }
    return keys


def test_open_clip_key_generator_reproduces_the_sdxl_file():
    assert open_clip_text_keys(**VIT_BIGG_14) == keys_under("sdxl-checkpoint-keys.txt", "conditioner.embedders.1.model.")


def test_sd2_text_encoder_has_the_layout_of_the_original_config():
    assert shapes_of(meta_encoder(OPENCLIP_VIT_H)) == open_clip_text_keys(**VIT_H_14)
    assert (OPENCLIP_VIT_H.heads, OPENCLIP_VIT_H.activation, OPENCLIP_VIT_H.layout) == (16, "gelu", "open_clip")


def test_full_size_heads_and_activations():
    assert (CLIP_VIT_L.heads, CLIP_VIT_L.activation, CLIP_VIT_L.projection_dim) == (12, "quick_gelu", None)
    assert (OPENCLIP_VIT_BIGG.heads, OPENCLIP_VIT_BIGG.activation) == (20, "gelu")
    model = meta_encoder(OPENCLIP_VIT_BIGG)
    assert model.transformer.resblocks[0].attn.heads == 20


# --- parity with transformers on tiny configs ----------------------------------------------------------------

TINY = dict(width=32, layers=3, heads=4, mlp_width=64)
CASES = {
    "clip-l-like": TextEncoderConfig("hf_clip", **TINY, activation="quick_gelu"),
    "hf-with-projection": TextEncoderConfig("hf_clip", **TINY, activation="gelu", projection_dim=24),
    "bigg-like": TextEncoderConfig("open_clip", **TINY, activation="gelu", projection_dim=24),
    "open-clip-no-projection": TextEncoderConfig("open_clip", **TINY, activation="quick_gelu"),
}


def transformers_model(config: TextEncoderConfig, seed: int = 0):
    """A random transformers CLIPTextModel(WithProjection); every parameter perturbed so biases and norms matter."""
    import transformers

    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.mlp_width,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        max_position_embeddings=config.max_positions,
        hidden_act=config.activation,
        projection_dim=config.projection_dim or config.width,
        bos_token_id=BOS,
        eos_token_id=EOS,  # not the legacy 2: transformers then pools the first EOS, as we do
    )
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if config.projection_dim else transformers.CLIPTextModel
    model = cls(hf_config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def prompt_ids(tokens: list[int], pad: int) -> list[int]:
    return [BOS, *tokens, EOS] + [pad] * (77 - len(tokens) - 2)


def prompt_batch() -> torch.Tensor:
    """Rows shaped like real prompts: EOS padding (SD1, SDXL's CLIP-L), 0 padding (OpenCLIP), a full chunk, empty."""
    g = torch.Generator().manual_seed(1)
    words = torch.randint(1, 49405, (75,), generator=g).tolist()
    return torch.tensor(
        [
            prompt_ids(words[:7], pad=EOS),
            prompt_ids(words[:12], pad=0),
            prompt_ids(words, pad=EOS),
            prompt_ids([], pad=EOS),
        ]
    )


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def our_model_from(hf_model, config: TextEncoderConfig):
    ours = build_text_encoder(config).eval()
    ours.load_state_dict(text_encoder_from_transformers(hf_model.state_dict(), config), strict=True)
    return ours


@pytest.mark.parametrize("case", CASES)
def test_tiny_text_encoder_computes_what_transformers_computes(case):
    config = CASES[case]
    hf = transformers_model(config)
    assert hf.config.eos_token_id == EOS
    ours = our_model_from(hf, config)
    ids = prompt_batch()
    final_norm = hf.text_model.final_layer_norm if config.projection_dim else hf.final_layer_norm
    with torch.no_grad():
        expected = hf(ids, output_hidden_states=True)
        expected_pooled = expected.text_embeds if config.projection_dim else expected.pooler_output
        penultimate = expected.hidden_states[-2]
        last = ours(ids)
        skipped = ours(ids, skip_layers=1, final_norm=False)
        skipped_normed = ours(ids, skip_layers=1, final_norm=True)
        assert relative_error(last.hidden, expected.last_hidden_state) < 1e-4
        assert relative_error(skipped.hidden, penultimate) < 1e-4
        assert relative_error(skipped_normed.hidden, final_norm(penultimate)) < 1e-4
        for output in (last, skipped, skipped_normed):
            assert output.pooled.shape == (4, config.projection_dim or config.width)
            assert relative_error(output.pooled, expected_pooled) < 1e-4


def test_pooled_is_read_at_the_first_eos_of_each_row():
    ids = prompt_batch()
    assert first_eos_positions(ids, EOS).tolist() == [8, 13, 76, 1]
    model = build_text_encoder(CASES["clip-l-like"]).eval()
    with torch.no_grad():
        out = model(ids)
    assert torch.equal(out.pooled, out.hidden[torch.arange(4), torch.tensor([8, 13, 76, 1])])


def test_clip_skip_beyond_the_layer_count_is_refused():
    model = build_text_encoder(CASES["bigg-like"])
    with pytest.raises(ValueError, match="clip skip"):
        model(prompt_batch(), skip_layers=3)


@pytest.mark.skipif(not TINY_KOHYA_CHECKPOINT.exists(), reason="sd-scripts fixture not present")
def test_sd_scripts_tiny_checkpoint_text_encoder_loads_strictly_and_computes_like_transformers():
    """A real SD1 file (fp16, int64 position_ids) written by sd-scripts: its te loads as is, and matches transformers."""
    from safetensors.torch import load_file

    prefix = "cond_stage_model.transformer."
    file = load_file(TINY_KOHYA_CHECKPOINT)
    state = {k[len(prefix) :]: v.float() if v.is_floating_point() else v for k, v in file.items() if k.startswith(prefix)}
    config = TextEncoderConfig("hf_clip", width=32, layers=2, heads=2, mlp_width=128)  # tiny_sd15_config.json
    ours = build_text_encoder(config).eval()
    ours.load_state_dict(state, strict=True)
    hf = transformers_model(config)
    hf_state = {k.removeprefix("text_model."): v for k, v in text_encoder_to_transformers(state, config).items()}
    hf.load_state_dict(hf_state, strict=True)
    ids = prompt_batch()
    with torch.no_grad():
        expected, got = hf(ids), ours(ids)
    assert relative_error(got.hidden, expected.last_hidden_state) < 1e-4
    assert relative_error(got.pooled, expected.pooler_output) < 1e-4


# --- conversions ---------------------------------------------------------------------------------------------


def with_text_model_prefix(state: dict) -> dict:
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}


@pytest.mark.parametrize("case", CASES)
def test_transformers_names_round_trip(case):
    config = CASES[case]
    hf_state = with_text_model_prefix(transformers_model(config).state_dict())
    back = text_encoder_to_transformers(text_encoder_from_transformers(hf_state, config), config)
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)


@pytest.mark.parametrize("case", CASES)
def test_our_names_round_trip(case):
    config = CASES[case]
    torch.manual_seed(0)
    state = build_text_encoder(config).state_dict()
    back = text_encoder_from_transformers(text_encoder_to_transformers(state, config), config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)


def test_our_weights_load_into_transformers_and_compute_the_same():
    """The inverse conversion gives what transformers (and Kohya's names) expect, strict, for OpenCLIP's fused q/k/v."""
    config = CASES["bigg-like"]
    torch.manual_seed(3)
    ours = build_text_encoder(config).eval()
    hf = transformers_model(config, seed=4)
    hf.load_state_dict(text_encoder_to_transformers(ours.state_dict(), config), strict=True)
    ids = prompt_batch()
    with torch.no_grad():
        expected, got = hf(ids), ours(ids)
    assert relative_error(got.hidden, expected.last_hidden_state) < 1e-4
    assert relative_error(got.pooled, expected.text_embeds) < 1e-4


def test_old_transformers_files_with_float_position_ids_convert():
    config = CASES["clip-l-like"]
    state = with_text_model_prefix(transformers_model(config).state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(77.0).unsqueeze(0) - 0.0001  # as some SD1 files carry
    converted = text_encoder_from_transformers(state, config)
    ids = converted["text_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64 and ids.tolist() == [list(range(77))]


def test_open_clip_conversion_fills_logit_scale_and_transposes_the_projection():
    config = CASES["bigg-like"]
    hf_state = transformers_model(config).state_dict()
    converted = text_encoder_from_transformers(hf_state, config)
    assert converted["logit_scale"].item() == pytest.approx(LOGIT_SCALE_INIT)
    assert torch.equal(converted["text_projection"], hf_state["text_projection.weight"].t())
    w = converted["transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(w[32:64], hf_state["text_model.encoder.layers.1.self_attn.k_proj.weight"])


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unexpected"):
        text_encoder_from_transformers({"vision_model.embeddings.class_embedding": torch.zeros(1)}, CASES["bigg-like"])
    with pytest.raises(ValueError, match="unexpected"):
        text_encoder_from_transformers({"vision_model.embeddings.class_embedding": torch.zeros(1)}, CASES["clip-l-like"])
    with pytest.raises(ValueError, match="unexpected"):
        text_encoder_to_transformers({"visual.proj": torch.zeros(1)}, CASES["bigg-like"])


# --- training and precision ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["clip-l-like", "bigg-like"])
def test_gradient_checkpointing_gives_the_same_gradients(case):
    config = CASES[case]
    torch.manual_seed(0)
    model = build_text_encoder(config).train()
    ids = prompt_batch()

    def gradients(checkpointing: bool) -> dict:
        model.zero_grad(set_to_none=True)
        model.set_gradient_checkpointing(checkpointing)
        out = model(ids, skip_layers=1, final_norm=False)
        (out.hidden.square().mean() + out.pooled.square().mean()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("case", ["clip-l-like", "bigg-like"])
def test_half_precision_runs_close_to_fp32(case, dtype, tolerance):
    config = CASES[case]
    torch.manual_seed(0)
    model = build_text_encoder(config).eval()
    ids = prompt_batch()
    with torch.no_grad():
        reference = model(ids, skip_layers=1)
        model.to(dtype)
        got = model(ids, skip_layers=1)
    assert got.hidden.dtype == dtype and got.pooled.dtype == dtype
    assert relative_error(got.hidden, reference.hidden) < tolerance
    assert relative_error(got.pooled, reference.pooled) < tolerance
    if isinstance(model, CLIPTextModel):
        assert model.text_model.embeddings.position_ids.dtype == torch.int64
    else:
        assert isinstance(model, OpenCLIPTextModel)


def test_layout_mismatch_is_refused():
    with pytest.raises(ValueError, match="layout"):
        CLIPTextModel(CASES["bigg-like"])
    with pytest.raises(ValueError, match="layout"):
        dataclasses.replace(CLIP_VIT_L, layout="t5")
