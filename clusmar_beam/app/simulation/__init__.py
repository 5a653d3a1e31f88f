"""`clusmar simulate`'s parts: the labelled data (data), the retrained models (models), the outcome (outcome)."""
