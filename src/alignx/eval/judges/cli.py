"""``alignx judge train|validate|score`` (work in progress: filled in by the judges work)."""

from __future__ import annotations

import argparse

from alignx.errors import AlignXError


def register(verbs) -> None:
    verbs.add_parser("judge", help="train, validate and run the judges (safety, truth, info, helpfulness, refusal)")


def run(args: argparse.Namespace) -> int:
    raise AlignXError("alignx judge is not available yet")
