"""The training loop pinned where a slip would train something else without a word."""

from __future__ import annotations

from lora_trainer.models.tokenizer import CLIPTokenizer
from lora_trainer.training.text import caption_chunks

TOKENIZER = CLIPTokenizer.default()


def test_a_chunk_of_padding_alone_starts_with_eos_for_encoders_that_pad_with_another_token_as_sd_scripts_gives_it():
    """--max_token_length 150/225 on SD2 and SDXL's second encoder (OpenCLIP pads with 0, not EOS): a short caption's
    later chunks are BOS, EOS, padding in sd-scripts (``<BOS> <PAD>`` becomes ``<BOS> <EOS>``), not BOS and padding
    alone, so they encode as the model was trained to see an empty chunk. CLIP-L pads with EOS: unchanged."""
    star = TOKENIZER.encode("a red star")
    eos, bos = TOKENIZER.eos_id, TOKENIZER.bos_id
    ids, weights = caption_chunks("a red star", TOKENIZER, 0, 225)
    assert ids[0] == [bos, *star, eos, *[0] * (75 - len(star))]
    assert ids[1] == ids[2] == [bos, eos, *[0] * 75]
    assert weights[1] == [1.0] * 77
    long = ", ".join(["star"] * 40)  # 79 tokens: the second chunk holds the caption's end
    second = caption_chunks(long, TOKENIZER, 0, 150)[0][1]
    assert second[:6] == [bos, *TOKENIZER.encode(long)[75:], eos] and set(second[6:]) == {0}
    ids, _ = caption_chunks("a red star", TOKENIZER, eos, 150)  # CLIP-L: padding is EOS already
    assert ids[1] == [bos, *[eos] * 76]
