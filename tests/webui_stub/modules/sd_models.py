"""Checkpoints as modules/sd_models.py lists and loads them; the model is our tiny SD1 checkpoint, dressed in the
LDM module tree the WebUI builds (model.diffusion_model, cond_stage_model wrapped by the prompt hijack, …)."""

import os

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


class FrozenCLIPEmbedderWithCustomWords(nn.Module):
    """The WebUI's prompt hijack: the text encoder module is reachable as ``.wrapped``."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped


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
    for slot, encoder in zip(config.text_encoders, model.text_encoders):
        _place(ldm, slot.prefix, encoder)
    if model.vae is not None:
        _place(ldm, config.vae_prefix, model.vae)
    if hasattr(ldm, "cond_stage_model"):
        ldm.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(ldm.cond_stage_model)
    if hasattr(ldm, "conditioner"):
        for index, embedder in enumerate(list(ldm.conditioner.embedders.children())):
            ldm.conditioner.embedders.add_module(str(index), FrozenCLIPEmbedderWithCustomWords(embedder))
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
