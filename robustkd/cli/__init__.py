"""The ``robustkd`` command line: ``main`` parses and runs one verb."""

from robustkd.cli.main import main
from robustkd.cli.parser import build_parser

__all__ = ["build_parser", "main"]
