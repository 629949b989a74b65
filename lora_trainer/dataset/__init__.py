"""Datasets: Kohya folder layouts and TOML configs, buckets, captions, image loading, tagging and the tag editor."""
