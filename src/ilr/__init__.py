"""ILR: Interactive Learning for LLM Reasoning."""

__version__ = "0.1.0.dev0"
