"""Training and certification: data checks and splits, maximum-likelihood fitting, the exactness
figures, the run that writes a versioned artifact, and the default models."""
