"""Data sets: the named ones, the user's own, and the one safe image reader."""
