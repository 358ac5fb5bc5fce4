"""Layers and models: the MLP under study, its stacked K-member form, the norm registry, and
layer norm, group norm and batch renorm from their formulas (norm_common: what they share).

`bnexp/layers.py` (the from-scratch batch norm users are pointed to) stays at the top level.
"""
