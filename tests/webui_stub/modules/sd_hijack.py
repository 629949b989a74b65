"""modules/sd_hijack.py: the one ``model_hijack`` object, whose ``embedding_db`` holds the textual-inversion
embeddings prompts may name."""

from modules.textual_inversion.textual_inversion import EmbeddingDatabase


class StableDiffusionModelHijack:
    def __init__(self):
        self.embedding_db = EmbeddingDatabase()
        self.comments = []


model_hijack = StableDiffusionModelHijack()
