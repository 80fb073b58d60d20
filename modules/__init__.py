"""Reusable parts of hashrec: hashing, embedding specs, archs and data sources.

Nothing in this package imports Hydra or ``train``: plain dataclasses and tensors go in,
``nn.Module``s and tensors come out, so every piece can be built and tested on its own.
"""
