"""``alignx eval`` (work in progress)."""

from __future__ import annotations

import argparse

from alignx.errors import AlignXError


def register(verbs) -> None:
    verbs.add_parser("eval", help="generate and score HHH benchmarks for several methods; write the report")


def run(args: argparse.Namespace) -> int:
    raise AlignXError("alignx eval is not available yet")
