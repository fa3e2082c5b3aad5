"""engine/demo."""
