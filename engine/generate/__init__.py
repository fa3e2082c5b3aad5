"""engine/generate."""
