"""Tokens: a dataset's cells -> model inputs (gene selection, neighbour graphs, batches)."""
