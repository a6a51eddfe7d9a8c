"""The ``dualenc`` command line (encode, index, search, retrieve, evaluate, mine): the top layer, wiring flags
to the library below it; no logic lives here."""

from dualenc.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
