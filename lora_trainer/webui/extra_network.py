"""``<lora:…>`` in WebUI prompts, applied by merging into the loaded model's weights with exact restore.

Registered by ``extension.py`` under the tag names it owns (see docs/webui.md, "Who answers <lora:…>").
The WebUI calls ``activate`` before every batch, with an empty list when the prompt has no tag: the merged set is
then made to equal exactly what the prompt asks for (MergedNetworks changes only what differs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from modules import extra_networks, shared

from ..errors import UserError
from ..networks.activation import LoraCall, LoraLibrary, at_rank, parse_lora_call, strength_of
from ..networks.apply import MergedNetworks, Strength
from ..networks.files import NetworkFile
from .model_map import checkpoint_config, merged_networks_for, sd_version_of_config

log = logging.getLogger("lora_trainer")
_REMOVE_SYMBOLS = str.maketrans("", "", ":,")  # the built-in strips these from names in "Lora hashes"


def list_hidden_files() -> bool:
    """The WebUI's Settings → "Load models/files in hidden directories" (on by default), which its Lora list obeys."""
    return bool(getattr(shared.opts, "list_hidden_files", True))


class ExtraNetworkLoraTrainer(extra_networks.ExtraNetwork):
    def __init__(self, folders: Callable[[], list[Path]]):
        super().__init__("lora")
        self.folders = folders
        self.library = LoraLibrary(folders(), list_hidden_files())
        self.warnings: list[str] = []  # every warning given, once each (the console shows them too)
        self._model = None  # the WebUI model self._merged belongs to
        self._merged: MergedNetworks | None = None
        self._config = None
        self._generation = None  # the processing object of the generation being activated: its comments
        self._bundled: dict[tuple, tuple] = {}  # (file, name) → (its data, the WebUI's Embedding made of it)
        self._bundled_registered: list = []  # the embeddings registered for the current generation

    # --- WebUI interface ----------------------------------------------------------------------------------------

    def activate(self, p, params_list):
        self._generation = p
        params_list = self._with_always_added(p, list(params_list))
        calls = []
        for params in params_list:
            try:
                calls.append(parse_lora_call(params.items))
            except UserError as error:
                self._warn(str(error))
        merged = self._merged_for(shared.sd_model)
        if merged is None:
            return
        wanted, loaded, hashes = [], [], {}
        for call in calls:
            found = self._network_for(call)
            if found is None:
                continue
            network, strength = found
            report = merged.check(network)
            if not report.ok:
                self._warn(f"<lora:{call.name}> skipped: {report.message()}")
                continue
            if note := report.ignored_note(embeddings_loaded=True):
                self._warn(f"<lora:{call.name}>: {note}")
            loaded.append(network)
            if call.has_effect:
                wanted.append((network, strength))
            hashes[call.name.translate(_REMOVE_SYMBOLS)] = self.library.short_hash(network.path)
        merged.set_networks(wanted)
        self._register_bundled_embeddings(loaded)
        if not getattr(shared.opts, "lora_add_hashes_to_infotext", True):  # the built-in Lora extension's setting
            return
        if not getattr(p, "is_hr_pass", False) or not hasattr(p, "lora_hashes"):  # hires fix: both passes' LoRAs
            p.lora_hashes = {}
        p.lora_hashes.update(hashes)
        if p.lora_hashes:
            p.extra_generation_params["Lora hashes"] = ", ".join(f"{name}: {short}" for name, short in p.lora_hashes.items())

    def _with_always_added(self, p, params_list: list) -> list:
        """The built-in's "Add network to prompt" setting (``sd_lora``): that LoRA in every prompt not naming it, at the
        default multiplier, written into the prompts as the built-in writes it (so the infotext says it)."""
        always = getattr(shared.opts, "sd_lora", "None")
        if always in ("None", "", None) or any(params.items and params.items[0] == always for params in params_list):
            return params_list
        if self.library.resolve(always) is None:
            return params_list
        multiplier = getattr(shared.opts, "extra_networks_default_multiplier", 1.0)
        p.all_prompts = [prompt + f"<lora:{always}:{multiplier}>" for prompt in getattr(p, "all_prompts", None) or []]
        return [*params_list, extra_networks.ExtraNetworkParams(items=[always, multiplier])]

    def deactivate(self, p):
        pass  # the weights stay merged until the next activate says otherwise, as with the built-in

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        folders, hidden = self.folders(), list_hidden_files()
        if folders != self.library.folders or hidden != self.library.list_hidden:
            self.library = LoraLibrary(folders, hidden)
        self.library.refresh()

    def restore(self) -> None:
        """Every merged weight back to the checkpoint's bits (script reload, extension unloaded)."""
        if self._merged is not None:
            self._merged.restore()

    def forget_model(self, loaded=None) -> None:
        """A checkpoint was loaded. Into the model object we merged into: its weights are fresh, so nothing is to be
        restored into them. As another object: the one we merged into may stay in memory (the WebUI's "Maximum number
        of checkpoints loaded at the same time" above 1) and come back later without a callback, so it gets its own
        weights back now."""
        if loaded is not self._model and self._merged is not None:
            try:
                self._merged.restore()
            except Exception as error:  # its weights were freed or moved away: nothing left to restore
                log.info("LoRA Trainer: the previous checkpoint's weights were not restored (%s)", error)
        self._model = self._merged = self._config = None

    # --- internals ----------------------------------------------------------------------------------------------

    def _merged_for(self, sd_model) -> MergedNetworks | None:
        if sd_model is None:
            return None
        if sd_model is not self._model:
            self.restore()
            info = getattr(sd_model, "sd_checkpoint_info", None)
            if info is None:
                return None
            self._config = checkpoint_config(Path(info.filename))
            self._merged, missing = merged_networks_for(sd_model, self._config)
            if missing:
                log.info("LoRA Trainer: %d layers of %s not found in the loaded model (e.g. %s); LoRAs skip them",
                         len(missing), self._config.label, missing[0])
            self._model = sd_model
        return self._merged

    def _network_for(self, call: LoraCall) -> tuple[NetworkFile, Strength] | None:
        path = self.library.resolve(call.name)
        if path is None:  # a file written since the last scan (a training run's new epoch), or new settings
            self.refresh()
            path = self.library.resolve(call.name)
        if path is None:
            self._warn(f"Lora not found: {call.name}")
            return None
        entry = self.library.entry(call.name)
        model_version = sd_version_of_config(self._config)
        if entry is not None and entry.sd_version not in ("unknown", model_version):
            self._warn(f"<lora:{call.name}> skipped: it was trained for {entry.sd_version}, the loaded model is {model_version}")
            return None
        try:
            strength = strength_of(call, self._config.unet)
            return at_rank(self.library.network(path), call.dyn), strength
        except UserError as error:
            self._warn(f"<lora:{call.name}> skipped: {error}")
            return None

    def _register_bundled_embeddings(self, networks: list[NetworkFile]) -> None:
        """The networks' bundled embeddings (``bundle_emb.*``) become the WebUI's textual-inversion embeddings for this
        generation, usable by name in its prompt, as the built-in Lora extension registers them (this runs before the
        prompt is encoded); the previous generation's are taken back first. An embedding of the same name loaded from
        the embeddings folder stays and is said; one of another model's shape is listed as skipped."""
        from modules import sd_hijack
        from modules.textual_inversion.textual_inversion import create_embedding_from_data

        database, model = sd_hijack.model_hijack.embedding_db, shared.sd_model
        for embedding in self._bundled_registered:  # ours only: the folder's may have been reloaded under that name
            if database.word_embeddings.get(embedding.name) is embedding:
                database.register_embedding_by_name(None, model, embedding.name)
        self._bundled_registered = []
        for network in networks:
            for name, data in network.embeddings.items():
                if name in database.word_embeddings:
                    self._warn(f"<lora:{network.name}>: its bundled embedding {name} is not used: an embedding of that "
                               "name is loaded from the embeddings folder")
                    continue
                cached = self._bundled.get((network.path, name))
                if cached is None or cached[0] is not data:  # first use, or the file was read again
                    cached = self._bundled[(network.path, name)] = (
                        data, create_embedding_from_data(data, name, filename=f"{network.path}/{name}"))
                embedding = cached[1]
                if database.expected_shape not in (-1, embedding.shape):
                    database.skipped_embeddings[name] = embedding
                    continue
                database.register_embedding(embedding, model)
                self._bundled_registered.append(embedding)

    def _warn(self, message: str) -> None:
        """Said under every image it concerns (the generation's comments, as the built-in says "Lora not found"), and
        once per session in the console."""
        comment = getattr(self._generation, "comment", None)
        if comment is not None:
            comment(f"LoRA Trainer: {message}")
        if message not in self.warnings:
            self.warnings.append(message)
            log.warning("LoRA Trainer: %s", message)
