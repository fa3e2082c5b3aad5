"""engine/export."""
