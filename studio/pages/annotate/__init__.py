"""studio/pages/annotate."""
