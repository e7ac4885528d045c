"""Sparse dictionaries: the SAE family, transcoders (pairwise and multi-layer), one Trainer, streaming training, evaluation. Imports data and core."""
