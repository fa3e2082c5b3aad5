"""core/memory."""
