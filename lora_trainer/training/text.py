"""Captions to UNet conditioning during training, the way sd-scripts does it (not the WebUI's prompt syntax).

A caption is tokenized as plain text (brackets are just characters), cut at 75 tokens — or 150/225 with
``max_token_length``, encoded in 75-token chunks whose states are joined as BOS + every chunk's tokens + EOS.
"""

from __future__ import annotations

import torch

from ..models.configs import ModelConfig
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import size_conditioning

CHUNK = 75


def caption_chunks(caption: str, tokenizer: CLIPTokenizer, pad_id: int, max_token_length: int | None) -> list[list[int]]:
    """Token ids as chunks of 77 (BOS + 75 + EOS), sd-scripts' layout for ``max_token_length`` None/150/225."""
    limit = max_token_length or CHUNK
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    tokens = tokenizer.encode(caption)[:limit]
    full = [bos, *tokens, eos, *[pad_id] * (limit - len(tokens))]
    if limit == CHUNK:
        return [full]
    chunks = []
    for start in range(1, limit + 1, CHUNK):
        piece = full[start : start + CHUNK]
        end = eos if piece[-1] not in (eos, pad_id) else pad_id  # a chunk cut mid-caption still ends with EOS
        chunks.append([bos, *piece, end])
    return chunks


def _joined(hidden: torch.Tensor, chunks: int) -> torch.Tensor:
    """[B·chunks, 77, C] → [B, 2 + 75·chunks, C]: first BOS, each chunk's 75 inner states, last EOS (sd-scripts)."""
    states = hidden.reshape(-1, chunks, hidden.shape[1], hidden.shape[2])
    if chunks == 1:
        return states[:, 0]
    inner = states[:, :, 1:-1].reshape(states.shape[0], chunks * CHUNK, states.shape[-1])
    return torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1)


def encode_captions(config: ModelConfig, text_encoders, captions: list[str], tokenizer: CLIPTokenizer, clip_skip: int = 1,
                    max_token_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context [B, T, ΣC], pooled [B, P] or None) — with gradients when the encoders are being trained."""
    states, pooled = [], None
    for slot, encoder in zip(config.text_encoders, text_encoders):
        device = next(encoder.parameters()).device
        ids = [caption_chunks(c, tokenizer, slot.pad_id, max_token_length) for c in captions]
        chunks = len(ids[0])
        flat = torch.tensor([chunk for caption in ids for chunk in caption], device=device)
        output = encoder(flat, skip_layers=slot.skip_layers + clip_skip - 1, final_norm=slot.final_norm)
        states.append(_joined(output.hidden, chunks))
        if output.pooled is not None:
            pooled = output.pooled.reshape(len(captions), chunks, -1)[:, 0]  # the first chunk's, as sd-scripts
    return torch.cat(states, dim=-1), pooled


def sdxl_vector(pooled: torch.Tensor, original_sizes, crops, target_sizes) -> torch.Tensor:
    """SDXL's y per sample: pooled text + (original h, w), (crop top, left), (target h, w) embeddings."""
    rows = [size_conditioning(pooled[i : i + 1], tuple(o), tuple(c), tuple(t))
            for i, (o, c, t) in enumerate(zip(original_sizes, crops, target_sizes))]
    return torch.cat(rows)
