"""Textual-inversion embeddings as modules/textual_inversion/textual_inversion.py (v1.10) keeps them: the parts an
extension registering embeddings uses (the built-in Lora extension registers a LoRA's bundled ones)."""

import torch


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.filename = None


class EmbeddingDatabase:
    def __init__(self):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.expected_shape = -1

    def register_embedding(self, embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding, model, name):
        # the real one keys its lookup by the name's first token id (model.cond_stage_model.tokenize); the name here
        first_id = name
        lookup = [x for x in self.ids_lookup.get(first_id, []) if x[1].name != name]
        if embedding is not None:
            lookup.append(([first_id], embedding))
        self.ids_lookup[first_id] = lookup
        if embedding is None:
            self.word_embeddings.pop(name, None)
            if not self.ids_lookup[first_id]:
                del self.ids_lookup[first_id]
            return None
        self.word_embeddings[name] = embedding
        return embedding


def create_embedding_from_data(data, name, filename='unknown embedding file', filepath=None):
    if 'string_to_param' in data:  # textual inversion embeddings
        param_dict = data['string_to_param']
        assert len(param_dict) == 1, 'embedding file has multiple terms in it'
        vec = next(iter(param_dict.values())).detach().to(dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    elif isinstance(data, dict) and 'clip_g' in data and 'clip_l' in data:  # SDXL embedding
        vec = {k: v.detach().to(dtype=torch.float32) for k, v in data.items()}
        shape, vectors = data['clip_g'].shape[-1] + data['clip_l'].shape[-1], data['clip_g'].shape[0]
    else:
        raise Exception(f"Couldn't identify {filename} as neither textual inversion embedding nor diffuser concept.")
    embedding = Embedding(vec, name)
    embedding.vectors, embedding.shape, embedding.filename = vectors, shape, filepath
    return embedding
