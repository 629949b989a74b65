"""Captions to UNet conditioning during training, the way sd-scripts does it (not the WebUI's prompt syntax).

A caption is tokenized as plain text (brackets are just characters), cut at 75 tokens — or 150/225 with
``max_token_length``, encoded in 75-token chunks whose states are joined as BOS + every chunk's tokens + EOS.
With ``--weighted_captions`` the ``(word:1.2)``/``(word)``/``[word]`` syntax is read instead (the brackets are then
not text) and each token's final state is multiplied by its weight, as sd-scripts' current code does (no mean
restoration, unlike the WebUI's prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..console import progress_bar
from ..hashing import weights_fingerprint
from ..models.configs import ModelConfig
from ..models.prompt import parse_prompt_attention
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import size_conditioning

CHUNK = 75


@dataclass(frozen=True)
class CaptionEncoding:
    """How captions become text-encoder states: sd-scripts' ``--clip_skip``, ``--max_token_length``, ``--weighted_captions``."""

    clip_skip: int = 1
    max_token_length: int | None = None
    weighted: bool = False


def caption_tokens(caption: str, tokenizer: CLIPTokenizer, limit: int, weighted: bool = False) -> tuple[list[int], list[float]]:
    """The caption's token ids (no BOS/EOS, cut at ``limit``) and each one's weight (1.0 unless ``weighted``)."""
    if not weighted:
        tokens = tokenizer.encode(caption)[:limit]
        return tokens, [1.0] * len(tokens)
    tokens, weights = [], []
    for text, weight in parse_prompt_attention(caption):
        ids = tokenizer.encode(text)
        tokens += ids
        weights += [1.0 if weight == -1.0 else weight] * len(ids)  # BREAK is just a word to sd-scripts
    return tokens[:limit], weights[:limit]


def caption_chunks(caption: str, tokenizer: CLIPTokenizer, pad_id: int, max_token_length: int | None,
                   weighted: bool = False) -> tuple[list[list[int]], list[list[float]]]:
    """Token ids as chunks of 77 (BOS + 75 + EOS), sd-scripts' layout for ``max_token_length`` None/150/225, and
    the tokens' weights in the same layout (1.0 for BOS, EOS and padding)."""
    limit = max_token_length or CHUNK
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    tokens, token_weights = caption_tokens(caption, tokenizer, limit, weighted)
    padding = limit - len(tokens)
    full = [bos, *tokens, eos, *[pad_id] * padding]
    weights = [1.0, *token_weights, 1.0, *[1.0] * padding]
    if limit == CHUNK:
        return [full], [weights]
    chunks, chunk_weights = [], []
    for start in range(1, limit + 1, CHUNK):
        piece = full[start : start + CHUNK]
        end = eos if piece[-1] not in (eos, pad_id) else pad_id  # a chunk cut mid-caption still ends with EOS
        if piece[0] == pad_id:  # a chunk past the caption: sd-scripts turns <BOS> <PAD> into <BOS> <EOS>
            piece = [eos, *piece[1:]]
        chunks.append([bos, *piece, end])
        chunk_weights.append([1.0, *weights[start : start + CHUNK], 1.0])
    return chunks, chunk_weights


def _joined(hidden: torch.Tensor, chunks: int) -> torch.Tensor:
    """[B·chunks, 77, C] → [B, 2 + 75·chunks, C]: first BOS, each chunk's 75 inner states, last EOS (sd-scripts)."""
    states = hidden.reshape(-1, chunks, hidden.shape[1], hidden.shape[2])
    if chunks == 1:
        return states[:, 0]
    inner = states[:, :, 1:-1].reshape(states.shape[0], chunks * CHUNK, states.shape[-1])
    return torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1)


def encode_captions(config: ModelConfig, text_encoders, captions: list[str], tokenizer: CLIPTokenizer,
                    encoding: CaptionEncoding = CaptionEncoding()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context [B, T, ΣC], pooled [B, P] or None) — with gradients when the encoders are being trained."""
    states, pooled = [], None
    for slot, encoder in zip(config.text_encoders, text_encoders):
        device = next(encoder.parameters()).device
        tokenized = [caption_chunks(c, tokenizer, slot.pad_id, encoding.max_token_length, encoding.weighted) for c in captions]
        chunks = len(tokenized[0][0])
        flat = torch.tensor([chunk for ids, _ in tokenized for chunk in ids], device=device)
        output = encoder(flat, skip_layers=config.skip_layers(slot, encoding.clip_skip), final_norm=slot.final_norm)
        hidden = output.hidden
        if encoding.weighted:
            weights = torch.tensor([chunk for _, w in tokenized for chunk in w], device=device, dtype=hidden.dtype)
            hidden = hidden * weights[..., None]
        states.append(_joined(hidden, chunks))
        if output.pooled is not None:
            pooled = output.pooled.reshape(len(captions), chunks, -1)[:, 0]  # the first chunk's, as sd-scripts
    return torch.cat(states, dim=-1), pooled


def sdxl_vector(pooled: torch.Tensor, original_sizes, crops, target_sizes) -> torch.Tensor:
    """SDXL's y per sample: pooled text + (original h, w), (crop top, left), (target h, w) embeddings."""
    rows = [size_conditioning(pooled[i : i + 1], tuple(o), tuple(c), tuple(t))
            for i, (o, c, t) in enumerate(zip(original_sizes, crops, target_sizes))]
    return torch.cat(rows)


TE_OUTPUTS_SUFFIX = "_te_outputs.npz"  # sd-scripts' name for a cached caption, beside its image


def te_outputs_path(image: Path) -> Path:
    return image.with_name(image.stem + TE_OUTPUTS_SUFFIX)


class TextEncoderCache:
    """Every caption encoded once before training (``--cache_text_encoder_outputs``): the UNet-only run then needs
    the text encoders no more. With ``--cache_text_encoder_outputs_to_disk`` each image gets sd-scripts'
    ``<image>_te_outputs.npz`` (``hidden_state1``, ``hidden_state2``, ``pool2`` for SDXL; ``hidden_state1`` for
    one encoder), read back instead of encoding when its shapes fit, its caption is still the image's and it was
    not made by other text encoders (sd-scripts would read a cache of another base model's)."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.encoding = CaptionEncoding()
        self._outputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._made_by = ""  # the text encoders' weights_fingerprint
        self.unmarked: list[Path] = []  # caches read that do not record their text encoders (sd-scripts', older ours)

    def fill(self, text_encoders, captions_by_image: dict, tokenizer: CLIPTokenizer, encoding: CaptionEncoding,
             to_disk: bool, batch_size: int = 16) -> None:
        if encoding != self.encoding:
            self._outputs.clear()
        self.encoding = encoding
        self._made_by = weights_fingerprint(*text_encoders) if to_disk else ""
        todo: dict[str, list] = {}
        for image, caption in captions_by_image.items():
            if caption in self._outputs:
                continue
            loaded = self._read(image, caption) if to_disk else None
            if loaded is not None:
                self._outputs[caption] = loaded
            else:
                todo.setdefault(caption, []).append(image)
        captions = list(todo)
        bar = progress_bar(len(captions), "caption", "caching text encoder outputs", leave=False)
        with torch.no_grad():
            for start in range(0, len(captions), batch_size):
                chunk = captions[start : start + batch_size]
                context, pooled = encode_captions(self.config, text_encoders, chunk, tokenizer, encoding)
                for i, caption in enumerate(chunk):
                    output = (context[i].float().cpu(), None if pooled is None else pooled[i].float().cpu())
                    self._outputs[caption] = output
                    if to_disk:
                        for image in todo[caption]:
                            self._write(image, caption, *output)
                bar.update(len(chunk))
        bar.close()

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        missing = [c for c in captions if c not in self._outputs]
        if missing:
            raise KeyError(f"caption not cached: {missing[0]!r}")
        outputs = [self._outputs[c] for c in captions]
        pooled = None if outputs[0][1] is None else torch.stack([o[1] for o in outputs])
        return torch.stack([o[0] for o in outputs]), pooled

    def _widths(self) -> list[int]:
        return [slot.config.width for slot in self.config.text_encoders]

    def _write(self, image, caption: str, context: torch.Tensor, pooled: torch.Tensor | None) -> None:
        import numpy as np

        from ..safe_io import save_npz

        arrays = {f"hidden_state{i + 1}": part.numpy() for i, part in enumerate(context.split(self._widths(), dim=-1))}
        if pooled is not None:
            arrays[f"pool{len(self._widths())}"] = pooled.numpy()
        arrays["caption"] = np.array(caption)  # ours (sd-scripts ignores these): an edited caption is encoded again,
        arrays["encoding"] = np.array(repr(self.encoding))  # and so is one cached with another clip skip or weighting
        arrays["text_encoders"] = np.array(self._made_by)  # or by other text encoders (another base model)
        save_npz(te_outputs_path(image), arrays)

    def _read(self, image, caption: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        import numpy as np

        from ..safe_io import UNREADABLE_NPZ

        path = te_outputs_path(image)
        if not path.exists():
            return None
        try:
            with np.load(path) as npz:
                if "caption" in npz and str(npz["caption"]) != caption:
                    return None
                if "encoding" in npz and str(npz["encoding"]) != repr(self.encoding):
                    return None
                if "text_encoders" in npz and str(npz["text_encoders"]) != self._made_by:
                    return None
                parts = [torch.from_numpy(npz[f"hidden_state{i + 1}"]).float() for i in range(len(self._widths()))]
                pool_key = f"pool{len(self._widths())}"
                pooled = torch.from_numpy(npz[pool_key]).float() if pool_key in npz else None
                marked = "text_encoders" in npz
        except UNREADABLE_NPZ:
            return None  # unreadable or another layout: encode again
        if [p.shape[-1] for p in parts] != self._widths() or len({p.shape[0] for p in parts}) != 1:
            return None
        if not marked:
            self.unmarked.append(path)
        return torch.cat(parts, dim=-1), pooled
