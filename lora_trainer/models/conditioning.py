"""Prompts to UNet conditioning: WebUI prompt syntax -> token chunks -> text encoder states (+ SDXL's vector)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .configs import ModelConfig
from .prompt import PromptChunks, apply_emphasis, tokenize_prompt
from .tokenizer import CLIPTokenizer


@dataclass
class Conditioning:
    """What the UNet sees of a batch of prompts: token states [B, 77·chunks, C] and the pooled vector [B, P]."""

    context: torch.Tensor
    pooled: torch.Tensor | None

    def chunks(self) -> int:
        return self.context.shape[1] // 77

    def split(self, rows: int) -> tuple[Conditioning, Conditioning]:
        """The first ``rows`` prompts and the rest."""
        pooled = (None, None) if self.pooled is None else (self.pooled[:rows], self.pooled[rows:])
        return Conditioning(self.context[:rows], pooled[0]), Conditioning(self.context[rows:], pooled[1])

    def padded_to(self, chunks: int, empty: Conditioning) -> Conditioning:
        """Append the empty prompt's chunk until there are ``chunks`` chunks, as the WebUI pads cond vs uncond."""
        missing = chunks - self.chunks()
        if missing <= 0:
            return self
        filler = empty.context[:1].expand(self.context.shape[0], -1, -1).repeat(1, missing, 1)
        return Conditioning(torch.cat([self.context, filler.to(self.context)], dim=1), self.pooled)


def encode_prompts(
    config: ModelConfig,
    text_encoders: list[torch.nn.Module],
    prompts: list[str],
    clip_skip: int = 1,
    tokenizer: CLIPTokenizer | None = None,
) -> Conditioning:
    """Encode each prompt chunk by chunk through every text encoder, with the WebUI's emphasis.

    ``clip_skip`` is the WebUI's/sd-scripts' setting: 1 = the layer the model was made for, 2 = one earlier, ...
    """
    if clip_skip < 1:
        raise ValueError(f"clip skip must be 1 or more, got {clip_skip}")
    tokenizer = tokenizer or CLIPTokenizer.default()
    per_prompt = [_encode_one(config, text_encoders, prompt, clip_skip, tokenizer) for prompt in prompts]
    longest = max(c.chunks() for c in per_prompt)
    if any(c.chunks() != longest for c in per_prompt):
        empty = _encode_one(config, text_encoders, "", clip_skip, tokenizer)
        per_prompt = [c.padded_to(longest, empty) for c in per_prompt]
    context = torch.cat([c.context for c in per_prompt])
    pooled = None if per_prompt[0].pooled is None else torch.cat([c.pooled for c in per_prompt])
    return Conditioning(context, pooled)


def _encode_one(config, text_encoders, prompt: str, clip_skip: int, tokenizer) -> Conditioning:
    states, pooled = [], None
    for slot, encoder in zip(config.text_encoders, text_encoders):
        chunks: PromptChunks = tokenize_prompt(prompt, tokenizer, pad_id=slot.pad_id)
        device = next(encoder.parameters()).device
        ids = torch.tensor(chunks.tokens, device=device)
        weights = torch.tensor(chunks.weights, device=device)
        output = encoder(ids, skip_layers=config.skip_layers(slot, clip_skip), final_norm=slot.final_norm)
        hidden = torch.cat([apply_emphasis(output.hidden[i : i + 1], weights[i : i + 1]) for i in range(len(ids))], dim=1)
        states.append(hidden)
        pooled = output.pooled[:1]  # the pooled vector of the first chunk, as the WebUI and sd-scripts use
    return Conditioning(torch.cat(states, dim=-1), pooled)
