"""Answering: loading a checkpoint (presets, hub, LLaVA conversion), the generation engine with its
grammar constraint, answer positions and image attention, and token accounting. Never imports training."""
