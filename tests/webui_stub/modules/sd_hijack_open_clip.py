"""The prompt hijack's wrappers around OpenCLIP text encoders (modules/sd_hijack_open_clip.py): SD2's and SDXL's
second encoder, the original embedder as ``.wrapped``."""

from modules import sd_hijack_clip


class FrozenOpenCLIPEmbedderWithCustomWords(sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
    pass


class FrozenOpenCLIPEmbedder2WithCustomWords(sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
    pass
