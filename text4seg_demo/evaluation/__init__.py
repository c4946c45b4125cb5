"""Scoring models: manifests, the reference metrics, ``text4seg eval`` and ``text4seg bench``."""
