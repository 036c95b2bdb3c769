"""``alignx serve`` (work in progress)."""

from __future__ import annotations

import argparse

from alignx.errors import AlignXError


def register(verbs) -> None:
    verbs.add_parser("serve", help="serve a run over an OpenAI-compatible HTTP API with per-request routing")


def run(args: argparse.Namespace) -> int:
    raise AlignXError("alignx serve is not available yet")
