"""engine/train/model_patches."""
