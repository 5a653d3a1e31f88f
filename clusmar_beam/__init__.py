"""Cluster-Margin batch active learning (Citovsky et al., 2021) on Apache Beam.

Layers, each importing only those before it (tests/test_layers.py):
core (numpy/FAISS) <- transforms (Beam) <- pipelines (one per command) <- app (cli, rounds).
"""
