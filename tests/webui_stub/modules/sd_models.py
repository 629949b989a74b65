"""Checkpoints as modules/sd_models.py lists and loads them: our tiny SD1 checkpoint and whatever --ckpt-dir holds
(tiny SD2/SDXL ones in tests), dressed in the module tree the WebUI builds: model.diffusion_model, the text encoders
in ldm's/sgm's embedders (OpenCLIP as open_clip's own modules, nn.MultiheadAttention included) wrapped by the prompt
hijack (cond_stage_model.wrapped…, conditioner.embedders.N.wrapped…)."""

import os

import torch
from torch import nn

from modules import script_callbacks, shared

checkpoints_list = {}
checkpoint_aliases = {}


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = os.path.basename(filename)
        self.name_for_extra = os.path.splitext(self.name)[0]
        self.model_name = os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.title = self.name
        self.metadata = {}

    def calculate_shorthash(self):
        from lora_trainer.hashing import file_sha256

        self.sha256 = file_sha256(self.filename)
        self.shorthash = self.sha256[0:10]
        self.title = f"{self.name} [{self.shorthash}]"
        return self.shorthash

    def register(self):
        checkpoints_list[self.title] = self
        for alias in (self.title, self.name, self.name_for_extra, self.model_name):
            checkpoint_aliases[alias] = self


def list_models():
    from lora_trainer.tiny_model.build import TINY_MODEL_PATH

    checkpoints_list.clear()
    checkpoint_aliases.clear()
    files = [str(TINY_MODEL_PATH)]
    if shared.cmd_opts.ckpt_dir and os.path.isdir(shared.cmd_opts.ckpt_dir):
        files += sorted(os.path.join(shared.cmd_opts.ckpt_dir, f) for f in os.listdir(shared.cmd_opts.ckpt_dir)
                        if f.endswith((".safetensors", ".ckpt")))
    for filename in files:
        info = CheckpointInfo(filename)
        info.calculate_shorthash()
        info.register()


def get_closet_checkpoint_match(search_string):
    return checkpoint_aliases.get(search_string)


def select_checkpoint():
    if not checkpoints_list:
        list_models()
    return checkpoint_aliases.get(shared.opts.sd_model_checkpoint) or next(iter(checkpoints_list.values()))


class _Container(nn.Module):
    pass


# --- the text encoders as the WebUI holds them ----------------------------------------------------------------
# ldm.modules.encoders.modules (SD1, SD2) and sgm.modules.encoders.modules (SDXL) in the real WebUI: CLIP-L is
# transformers' CLIPTextModel under ``.transformer``; OpenCLIP is open_clip's text tower under ``.model``, whose
# attention is torch.nn.MultiheadAttention. The prompt hijack then wraps each embedder (``.wrapped``).


class FrozenCLIPEmbedder(nn.Module):
    def __init__(self, transformer, layer="last"):
        super().__init__()
        self.transformer = transformer
        self.layer = layer


class OpenCLIPTextTower(nn.Module):
    """open_clip.model.CLIP without its visual tower (ldm/sgm delete it): the text side's own parameter names."""

    def __init__(self, config):
        super().__init__()
        from open_clip.transformer import Transformer, build_causal_mask

        self.context_length = config.max_positions
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.max_positions, config.width))
        self.transformer = Transformer(config.width, config.layers, config.heads, mlp_ratio=config.mlp_width / config.width)
        self.ln_final = nn.LayerNorm(config.width)
        projection = config.projection_dim
        self.text_projection = nn.Parameter(torch.empty(config.width, projection)) if projection else None
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.register_buffer("attn_mask", build_causal_mask(config.max_positions), persistent=False)


class FrozenOpenCLIPEmbedder(nn.Module):
    """SD2's encoder (ldm): the penultimate layer, after ln_final."""

    def __init__(self, model, layer="penultimate"):
        super().__init__()
        self.model = model
        self.layer = layer
        self.layer_idx = 1 if layer == "penultimate" else 0


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """SDXL's second encoder (sgm): the penultimate layer without ln_final, plus the pooled projection."""

    def __init__(self, model, layer="penultimate"):
        super().__init__(model, layer)
        self.return_pooled = True
        self.legacy = False


class _SampledThroughTheWebUIModules(nn.Module):
    """What the stand-in's sampling calls for an OpenCLIP encoder: our encoder interface (hidden states of a layer,
    the pooled vector), computed by the WebUI-layout tower, so merged weights are used the way the WebUI uses them."""

    def __init__(self, embedder, config):
        super().__init__()
        self.embedder = embedder
        self.config = config

    def forward(self, input_ids, skip_layers=0, final_norm=True):
        from lora_trainer.models.text_encoders import TextEncoderOutput, pool_at_eos

        tower = self.embedder.model
        length = input_ids.shape[1]
        x = tower.token_embedding(input_ids) + tower.positional_embedding[:length]
        x = x.permute(1, 0, 2)  # sequence first, as open_clip runs its blocks
        mask = tower.attn_mask[:length, :length]
        keep = len(tower.transformer.resblocks) - skip_layers
        hidden = x
        for index, block in enumerate(tower.transformer.resblocks, start=1):
            x = block(x, attn_mask=mask)
            if index == keep:
                hidden = x
        hidden, x = hidden.permute(1, 0, 2), x.permute(1, 0, 2)
        last = tower.ln_final(x)
        if final_norm:
            hidden = last if skip_layers == 0 else tower.ln_final(hidden)
        pooled = pool_at_eos(last, input_ids, self.config.eos_id)
        return TextEncoderOutput(hidden, pooled if tower.text_projection is None else pooled @ tower.text_projection)


def _embedder(model, slot, encoder):
    """The embedder the WebUI builds for one text encoder slot, holding the loaded weights."""
    if slot.config.layout == "hf_clip":
        return FrozenCLIPEmbedder(encoder, layer="hidden" if slot.skip_layers else "last")
    tower = OpenCLIPTextTower(slot.config)
    tower.load_state_dict(encoder.state_dict())  # open_clip's names are the checkpoint's: nothing to convert
    tower.to(next(encoder.parameters()).dtype)
    kind = FrozenOpenCLIPEmbedder2 if slot.final_norm is False and model.config.needs_size_conditioning else FrozenOpenCLIPEmbedder
    return kind(tower)


def _hijack(embedder, index, config):
    """modules/sd_hijack.py: each text encoder wrapped in the class made for it (its weights under ``.wrapped``)."""
    from modules import sd_hijack_clip, sd_hijack_open_clip

    if config.needs_size_conditioning:  # SDXL's conditioner
        kind = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords if index == 0 else sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords
    elif isinstance(embedder, FrozenOpenCLIPEmbedder):
        kind = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords
    else:
        kind = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords
    return kind(embedder, None)


def _place(root, dotted_prefix, module):
    parts = dotted_prefix.rstrip(".").split(".")
    node = root
    for part in parts[:-1]:
        if not hasattr(node, part):
            node.add_module(part, _Container())
        node = getattr(node, part)
    node.add_module(parts[-1], module)


def _latent_diffusion(model):
    """Our loaded model's parts in the WebUI's module tree (names = the checkpoint's names)."""
    config = model.config
    ldm = nn.Module()
    _place(ldm, config.unet_prefix, model.unet)
    for index, (slot, encoder) in enumerate(zip(config.text_encoders, model.text_encoders)):
        embedder = _embedder(model, slot, encoder)
        # the slot's prefix names the encoder inside its embedder (….transformer. / ….model.): place the embedder
        embedder_path = slot.prefix.rstrip(".").rsplit(".", 1)[0]
        _place(ldm, embedder_path, _hijack(embedder, index, config))
        if isinstance(embedder, FrozenOpenCLIPEmbedder):
            model.text_encoders[index] = _SampledThroughTheWebUIModules(embedder, slot.config)
    if model.vae is not None:
        _place(ldm, config.vae_prefix, model.vae)
    ldm.is_sdxl = config.name == "sdxl"
    ldm.is_sd2 = config.name.startswith("sd2")
    ldm.is_sd1 = config.name == "sd1"
    ldm.stub_model = model  # what the stand-in processing samples with; the extension never reads it
    return ldm


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    from lora_trainer.models.checkpoint import load_checkpoint

    checkpoint_info = checkpoint_info or select_checkpoint()
    sd_model = _latent_diffusion(load_checkpoint(checkpoint_info.filename))
    sd_model.sd_checkpoint_info = checkpoint_info
    sd_model.sd_model_checkpoint = checkpoint_info.filename
    sd_model.sd_model_hash = checkpoint_info.calculate_shorthash()
    shared.sd_model = sd_model
    shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model


def send_model_to_cpu(m):
    m.to("cpu")


def unload_model_weights(sd_model=None, info=None):
    send_model_to_cpu(sd_model or shared.sd_model)
    return sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    checkpoint_info = info or select_checkpoint()
    if shared.sd_model is None or forced_reload or shared.sd_model.sd_checkpoint_info.filename != checkpoint_info.filename:
        return load_model(checkpoint_info)
    return shared.sd_model
