"""engine/train/distributed."""
