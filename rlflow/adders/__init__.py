"""Adders: steps -> trainable items (placeholder)."""
