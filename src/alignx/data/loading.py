"""Reading a source's rows, from the local data directory or online, parsed and cached.

:func:`load_source` never crashes on a bad row: rows with missing fields, empty text (after strip),
wrong types, or unparseable JSON lines are skipped and counted by reason in ``LoadResult.skipped``.
A missing or unreadable file is an :class:`~alignx.errors.AlignXError` naming the file and the
setting that points to it. Every normalised row carries ``index``: its 0-based position in the
source file (counting rejected rows too), so positional splits such as "TruthfulQA questions 1-408"
do not shift when a row is rejected. Text fields are stripped.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import os
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignx.data.parsers import Parser, Skip
from alignx.data.registry import SETTING, SOURCES, HubSpec, Source, get_source
from alignx.errors import AlignXError


@dataclass
class LoadResult:
    """Parsed rows of one source (treat the dicts as read-only: they are cached) and skip counts."""

    rows: list[dict[str, Any]]
    skipped: Counter[str]
    origin: str = ""  # the file, hub id or URL the rows came from


# --------------------------------------------------------------------------------------------
# readers: bytes of a whole file -> (position, record | Skip)

Record = tuple[int, "dict[str, Any] | Skip"]


def _records(data: bytes, source: Source, where: str) -> Iterator[Record]:
    """Raw records of one file. File-level problems raise AlignXError; row-level ones yield Skip."""
    fmt = source.fmt
    try:
        if fmt == "jsonl.gz":
            data = gzip.decompress(data)
        text = data.decode("utf-8-sig")  # tolerates (and drops) a byte-order mark
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise AlignXError(f"{source.name}: cannot read {where}: {exc} (set by {SETTING})") from None

    if fmt in ("jsonl", "jsonl.gz"):
        position = 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                yield position, Skip("unparseable JSON line")
            else:
                yield position, rec if isinstance(rec, dict) else Skip("row is not a JSON object")
            position += 1
        return

    if fmt == "csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            rows = list(reader)
        except csv.Error as exc:
            raise AlignXError(f"{source.name}: cannot parse CSV {where}: {exc} (set by {SETTING})") from None
        for position, row in enumerate(rows):
            row.pop(None, None)  # surplus cells of a row longer than the header
            yield position, row
        return

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AlignXError(f"{source.name}: {where} is not valid JSON: {exc} (set by {SETTING})") from None
    if fmt == "json_list":
        if not isinstance(doc, list):
            raise AlignXError(f"{source.name}: {where} must hold a JSON list of rows, got {type(doc).__name__}")
        for position, rec in enumerate(doc):
            yield position, rec if isinstance(rec, dict) else Skip("row is not a JSON object")
        return
    if fmt == "json_columns":
        key = source.columns_key
        if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
            raise AlignXError(f"{source.name}: {where} must hold a JSON object with a list {key!r}")
        column = doc[key]
        others = {k: v for k, v in doc.items() if k != key and isinstance(v, list) and len(v) == len(column)}
        singular = {k: k[:-1] if k.endswith("s") else k for k in [key, *others]}
        for position, value in enumerate(column):
            rec = {singular[key]: value}
            rec.update({singular[k]: v[position] for k, v in others.items()})
            yield position, rec
        return
    raise ValueError(f"unknown file format {fmt!r} for source {source.name}")  # our bug, not the user's


def _parse_all(records: Iterator[Record], parse: Parser) -> tuple[list[dict[str, Any]], Counter[str]]:
    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    for position, rec in records:
        if isinstance(rec, Skip):
            skipped[str(rec)] += 1
            continue
        try:
            rows.append(parse(rec, position))
        except Skip as reason:
            skipped[str(reason)] += 1
    return rows, skipped


# --------------------------------------------------------------------------------------------
# loading


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def load_source(name: str, data_dir: Path | str | None) -> LoadResult:
    """Load and parse one source from ``data_dir`` (layout of shared/data), or online when None.

    Results are cached per process, keyed on (name, data_dir) and the file's mtime/size, so the
    20 MB Alpaca file is parsed once. The returned list is a fresh copy; its dicts are shared.
    """
    source = get_source(name)
    stamp = None
    if data_dir is not None:
        stamp = _file_stamp(Path(data_dir).expanduser() / source.path)
    cached = _load_cached(name, None if data_dir is None else str(data_dir), stamp)
    return LoadResult(rows=list(cached.rows), skipped=Counter(cached.skipped), origin=cached.origin)


def clear_cache() -> None:
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=64)
def _load_cached(name: str, data_dir: str | None, stamp: tuple[int, int] | None) -> LoadResult:
    source = SOURCES[name]
    if data_dir is None:
        return _load_online(source)
    return _load_local(source, Path(data_dir).expanduser())


def _load_local(source: Source, data_dir: Path) -> LoadResult:
    if not data_dir.is_dir():
        raise AlignXError(
            f"data directory {data_dir} does not exist (set by {SETTING}); point it at a copy laid out like "
            f"shared/data, or unset both to read from the Hugging Face hub"
        )
    path = data_dir / source.path
    if not path.is_file():
        raise AlignXError(
            f"{source.name}: file not found: {path} (expected {source.path} under the data directory "
            f"{data_dir}, set by {SETTING})"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AlignXError(f"{source.name}: cannot read {path}: {exc} (set by {SETTING})") from None
    rows, skipped = _parse_all(_records(data, source, str(path)), source.parse)
    return LoadResult(rows, skipped, origin=str(path))


def _load_online(source: Source) -> LoadResult:
    if source.hub is None and source.url is None:
        raise AlignXError(
            f"{source.name} is only available from a local copy: set {SETTING} to a directory laid out like "
            f"shared/data (expected file {source.path})"
        )
    errors: list[str] = []
    if source.hub is not None:
        try:
            return _load_hub(source, source.hub)
        except Exception as exc:  # offline, gated, renamed...: fall through to the URL or the error below
            errors.append(f"hub {source.hub.describe()}: {type(exc).__name__}: {exc}")
    if source.url is not None:
        try:
            return _load_url(source, source.url)
        except AlignXError:
            raise
        except Exception as exc:
            errors.append(f"{source.url}: {type(exc).__name__}: {exc}")
    raise AlignXError(
        f"{source.name}: no data directory is set and loading it online failed ({'; '.join(errors)}). "
        f"Set {SETTING} to a local copy laid out like shared/data (expected file {source.path}), or go online."
    )


def _load_hub(source: Source, hub: HubSpec) -> LoadResult:
    import datasets  # lazy: heavy import, only needed online

    kwargs: dict[str, Any] = {"split": hub.split}
    if hub.data_dir:
        kwargs["data_dir"] = hub.data_dir
    ds = datasets.load_dataset(hub.path, hub.name, **kwargs) if hub.name else datasets.load_dataset(hub.path, **kwargs)
    parse = source.hub_parse or source.parse
    records = ((i, dict(rec) if isinstance(rec, dict) else Skip("row is not a JSON object")) for i, rec in enumerate(ds))
    rows, skipped = _parse_all(records, parse)
    return LoadResult(rows, skipped, origin=f"hub:{hub.describe()}")


def _load_url(source: Source, url: str) -> LoadResult:
    timeout = float(os.environ.get("ALIGNX_DOWNLOAD_TIMEOUT", "60"))
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - fixed https URLs
        data = response.read()
    rows, skipped = _parse_all(_records(data, source, url), source.parse)
    return LoadResult(rows, skipped, origin=url)
