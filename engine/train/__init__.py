"""engine/train."""
