"""studio/services."""
