"""The flow model: the allow-listed zuko architectures, the density with its standardisation
folded in, the fused inverse, conformal calibration, and the verified artifact and repository."""
