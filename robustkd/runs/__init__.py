"""Runs: the run folder on disk, its lock and liveness, the worker queue, and uploads."""
