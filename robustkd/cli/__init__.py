"""The ``robustkd`` command line: ``main`` parses and runs one verb."""

from robustkd.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
