"""Rate limiters (placeholder)."""
