"""Gated VLM content moderation: the logic shared by the Triton models, the clients and the tests."""
__version__ = "0.1.0"
