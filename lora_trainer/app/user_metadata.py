"""The WebUI's Lora card, filled after training: ``<lora>.json`` beside the file, with the keys the card editor
reads (``activation text``, ``preferred weight``, ``sd version``, ``description``, ``notes``).

Trigger words come from the captions the run recorded (``ss_tag_frequency``): the tags every image of a concept
folder carries, which is what a trigger word is; without captions, the folder's class name.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..networks.tools.inspect import trigger_words
from ..safe_io import read_safetensors_metadata, write_text


def sd_version(metadata: dict[str, str]) -> str:
    """The version the WebUI tells from the file (its Lora ``detect_version``), which the card's value overrides in
    its Lora tab's filter: a value it would not give ("Unknown" for an SD1 v-prediction run's ``sd_v1_v``) changed
    which models the LoRA is listed for."""
    base = str(metadata.get("ss_base_model_version", ""))
    if base.startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":  # the WebUI's test; our files write it beside sd_v2…
        return "SD2"
    return "SD1" if metadata else "Unknown"


def network_shape(lora: Path) -> tuple[int | None, float | None]:
    """The file's rank and alpha read from its tensors (None, None where it cannot be read as a network)."""
    from ..errors import UserError
    from ..networks.files import read_network
    from ..networks.tools.inspect import rank_and_alpha

    try:
        return rank_and_alpha(read_network(lora))
    except UserError:
        return None, None


def card_metadata(metadata: dict[str, str], end_event: dict, preferred_weight: float = 1.0,
                  shape: tuple[int | None, float | None] = (None, None)) -> dict:
    """``shape``: the rank and alpha of the tensors (``network_shape``), which the card says rather than the
    ss_network_dim/alpha keys: sd-scripts writes the command's values there, "None" where it gave none."""
    advice = ""
    if end_event.get("recommended_epoch"):
        advice = f" Recommended epoch: {end_event['recommended_epoch']} ({end_event.get('reason', '')})."
    rank, alpha = shape
    dim = rank if rank is not None else metadata.get("ss_network_dim", "?").replace("None", "?")
    alpha = f"{alpha:g}" if alpha is not None else metadata.get("ss_network_alpha", "?").replace("None", "?")
    summary = (f"Trained with the LoRA Trainer on {metadata.get('ss_sd_model_name', 'an unknown model')}: "
               f"{metadata.get('ss_num_train_images', '?')} images, {end_event.get('epochs', metadata.get('ss_epoch', '?'))} epochs, "
               f"{end_event.get('steps', metadata.get('ss_steps', '?'))} steps, dim {dim} / "
               f"alpha {alpha}, lr {metadata.get('ss_learning_rate', '?')}.{advice}")
    return {
        "description": summary,
        "sd version": sd_version(metadata),
        "activation text": ", ".join(trigger_words(metadata)),
        "preferred weight": preferred_weight,
        "negative text": "",
        "notes": summary,
    }


WROTE = "lora trainer wrote"  # the card's fields as we last wrote them: the card editor keeps keys it does not know


def write_card_metadata(lora: Path, end_event: dict, preferred_weight: float = 1.0) -> Path:
    """Write (or update) ``<lora>.json``. What the user typed is kept: a field is ours to rewrite only while it is
    empty or still what we wrote last time (a resumed run's card then tells its whole run, not its first part)."""
    target = lora.with_suffix(".json")
    card = card_metadata(read_safetensors_metadata(lora), end_event, preferred_weight, network_shape(lora))
    existing = {}
    if target.exists():
        try:
            existing = json.loads(target.read_text(encoding="utf-8-sig"))
        except (OSError, json.JSONDecodeError):
            pass
    if not isinstance(existing, dict):
        existing = {}
    wrote = existing.get(WROTE) if isinstance(existing.get(WROTE), dict) else {}
    typed = {k: v for k, v in existing.items() if v not in ("", None) and (k not in wrote or wrote[k] != v)}
    write_text(target, json.dumps({**card, **typed, WROTE: card}, indent=4, ensure_ascii=False))
    return target
