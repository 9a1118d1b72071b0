"""Serving without HTTP: the operations on numpy arrays, the registry of loaded models and their
administration, the batching device worker, and the metrics it reports."""
