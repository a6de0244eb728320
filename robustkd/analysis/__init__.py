"""Analysis: features, attribution, predictions, metrics and profiling of a model."""
