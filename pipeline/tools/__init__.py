"""Developer tools: benchmarks, the upstream comparison, demo-model training.

They import the product; the product never imports them.
"""
