"""Training, evaluation, protocols and result records, shared by every host method."""
