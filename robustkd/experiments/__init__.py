"""Experiments: presets, teacher training and the comparison of methods."""
