"""Data stages: reading DREAM files, synthesis, tokenizers, shards, loader, GloVe."""
