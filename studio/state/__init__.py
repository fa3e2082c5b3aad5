"""studio/state."""
