"""Entry modules: `python -m pipelines.NAME [flags]` runs `clusmar NAME` (the code is in clusmar_beam)."""
