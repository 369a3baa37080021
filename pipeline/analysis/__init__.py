"""Reading an atlas for people: summaries, plots, linear probes, held-out accuracy."""
