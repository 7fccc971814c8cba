"""Sparse dictionaries over a model's activations: SAEs, transcoders and the SAELens folder layout.

They live in the core because more than one experiment reads a model through them (multilingual feature
overlap trains them; circuits builds attribution graphs and interventions on them).
"""
