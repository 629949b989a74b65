"""Our own tiny SD1-architecture base model, trained on synthetic shapes, shipped as the embedded default."""
