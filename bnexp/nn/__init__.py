"""Layers and models: the MLP under study, its stacked K-member form, and the norm registry.

`bnexp/layers.py` (the from-scratch batch norm users are pointed to) stays at the top level.
"""
