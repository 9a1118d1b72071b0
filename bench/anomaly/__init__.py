"""ADBench-style anomaly benchmark: flowserve beside PyOD on small offline tabular sets (`make anomaly-bench`)."""
