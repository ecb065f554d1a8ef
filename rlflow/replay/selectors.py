"""Selectors (placeholder)."""
