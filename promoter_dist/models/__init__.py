"""Models as plain single-device torch modules (no distributed-training code)."""
