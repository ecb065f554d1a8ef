"""Vector environments (placeholder)."""
