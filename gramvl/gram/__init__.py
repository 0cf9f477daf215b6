"""GRAM: meta-training corpus features, cross-modal hierarchical clustering, meta-task sampling and more."""
