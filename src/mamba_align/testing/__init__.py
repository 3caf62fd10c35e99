"""Fixtures of the demo and the tests: tiny synthetic models, tokenizers and data."""
