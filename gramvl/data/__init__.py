"""Datasets: the embedded world, `folder:ROOT`, and the field's standard datasets."""
