"""Runtimes: where components live and how data crosses between them."""
