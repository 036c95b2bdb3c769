"""Where `make demo` and `make test` read the data sets from, decided before anything is installed.

The Makefile asks this module (run as a script, so it imports nothing but the standard library):

1. ``$ALIGNX_DATA_DIR`` set by the user: that copy, as it is;
2. otherwise a local copy beside the checkout (``../shared/data``) when there is one: that copy, offline
   (the embedded model and the judges' encoder ship with the install, so nothing else needs the hub);
3. otherwise the Hugging Face hub.

``--check`` (run by ``make demo`` before the install) then says in one line when the choice cannot work: a
directory that does not exist, or the hub with no way to reach it.

    python3 src/alignx/data/location.py --make ../shared/data    # the variables for the Makefile to export
    python3 src/alignx/data/location.py --check ../shared/data   # exit 2 with one line when it cannot work
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

TRUE = ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class DataLocation:
    """The decision: a local directory (None: the hub), the variables to export, and what is wrong, if anything."""

    data_dir: Path | None
    exports: dict[str, str] = field(default_factory=dict)
    problem: str | None = None

    def describe(self) -> str:
        return f"data: local copy {self.data_dir}" if self.data_dir is not None else "data: the Hugging Face hub"


def hub_reachable(environ: Mapping[str, str], timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint opens (behind a proxy: assumed, it cannot be probed)."""
    if any(environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def locate(environ: Mapping[str, str], local_copy: Path, *, check: bool = False,
           reachable: Callable[[Mapping[str, str]], bool] = hub_reachable) -> DataLocation:
    """Decide where the data comes from (see the module docstring); ``check`` also probes what it needs."""
    offline = environ.get("HF_HUB_OFFLINE", "").strip().upper() in TRUE
    if environ.get("ALIGNX_DATA_DIR"):
        chosen = Path(environ["ALIGNX_DATA_DIR"]).expanduser()
        problem = None
        if check and not chosen.is_dir():
            problem = (f"ALIGNX_DATA_DIR={chosen} does not exist: point it at a copy laid out like shared/data, "
                       "or unset it to read from the Hugging Face hub")
        return DataLocation(chosen, {}, problem)
    if local_copy.is_dir():
        exports = {"ALIGNX_DATA_DIR": str(local_copy.resolve())}
        if "HF_HUB_OFFLINE" not in environ:
            exports["HF_HUB_OFFLINE"] = "1"
        return DataLocation(local_copy.resolve(), exports)
    problem = None
    if check and (offline or not reachable(environ)):
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
        problem = (f"no data: there is no local copy at {local_copy} and {why}; set ALIGNX_DATA_DIR to a copy laid "
                   "out like shared/data (each data set's folder as in its SOURCE.md), or connect to the hub")
    return DataLocation(None, {}, problem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Where make reads the data sets from.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--make", action="store_true", help="print NAME=value pairs for the Makefile to export")
    mode.add_argument("--check", action="store_true", help="say in one line (exit 2) when the data cannot be read")
    parser.add_argument("local_copy", type=Path, help="the local copy to use when ALIGNX_DATA_DIR is unset")
    args = parser.parse_args(argv)
    decision = locate(os.environ, args.local_copy, check=args.check)
    if args.make:
        print(" ".join(f"{name}={value}" for name, value in decision.exports.items()))
        return 0
    if decision.problem is not None:
        print(f"alignx: error: {decision.problem}", file=sys.stderr)
        return 2
    print(decision.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
