"""The numerical core: numpy, SciPy and FAISS only (no Beam, no TensorFlow), so every rule here runs and is
tested in one process: hashing, cells, HAC, selection order, margins, checks."""
