"""Streaming reader for MIMIC-IV-layout gzip CSV tables.

Full MIMIC-IV has ~118 M lab rows (~13 GB of CSV): no table may be loaded
whole.  :func:`scan_table` decompresses in a background thread (zlib releases
the GIL), cuts the stream at row boundaries (quote-aware, since comment columns
hold quoted newlines), parses each block with polars, and hands it to a
``keep`` function that filters it down before the next block is read.  Peak
memory is one block plus what the filters keep.

Every input problem becomes an :class:`~diaggym.errors.InputError` naming the
file: a missing table, missing columns, an empty file, an unparseable
timestamp or number, a truncated or corrupt gzip stream.
"""

from __future__ import annotations

import gzip
import io
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from tqdm.auto import tqdm

from diaggym.errors import InputError

BLOCK_BYTES = 32 << 20
ROW = "_row"  # 1-based data row number carried with every block, for error messages
DATETIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d")


def find_table(root: Path, name: str, required: bool = True) -> Path | None:
    """``root/name.csv.gz`` (or uncompressed ``.csv``); a clear error when required and absent."""
    for suffix in (".csv.gz", ".csv"):
        p = root / f"{name}{suffix}"
        if p.is_file():
            return p
    if required:
        raise InputError(f"missing table {name}.csv.gz (expected in a MIMIC-IV layout folder)", root)
    return None


@dataclass
class TableSpec:
    """Columns to read and how to type them; every other column is skipped."""

    ints: tuple[str, ...] = ()
    floats: tuple[str, ...] = ()
    datetimes: tuple[str, ...] = ()
    strings: tuple[str, ...] = ()
    # Columns the ``keep`` filter needs.  When set, only these are typed before filtering and the
    # rest only on kept rows: big tables (labevents) drop ~90 % of rows, so this saves most casts.
    # A bad value in a column outside ``keys`` of a row that is filtered out goes unreported.
    keys: tuple[str, ...] | None = None

    @property
    def columns(self) -> list[str]:
        return [*self.ints, *self.floats, *self.datetimes, *self.strings]

    def subset(self, columns: set[str]) -> TableSpec:
        return TableSpec(
            ints=tuple(c for c in self.ints if c in columns),
            floats=tuple(c for c in self.floats if c in columns),
            datetimes=tuple(c for c in self.datetimes if c in columns),
        )


def _raw_blocks(path: Path, block_bytes: int, bar: tqdm | None) -> Iterator[bytes]:
    """Decompressed byte blocks, produced by a background thread so parsing overlaps inflation."""
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        try:
            with open(path, "rb") as raw:
                is_gz = raw.read(2) == b"\x1f\x8b"
                raw.seek(0)
                if is_gz:
                    # One decompressor object per gzip member; MIMIC files are single-member.
                    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    while not stop.is_set():
                        comp = raw.read(block_bytes // 4)
                        if bar is not None:
                            bar.update(len(comp))
                        if not comp:
                            tail = d.flush()
                            if tail:
                                q.put(tail)
                            if not d.eof:
                                raise EOFError("gzip stream ends before its end marker (file cut off?)")
                            break
                        out = d.decompress(comp)
                        while d.eof and d.unused_data:  # concatenated members
                            rest = d.unused_data
                            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                            out += d.decompress(rest)
                        if out:
                            q.put(out)
                else:
                    while not stop.is_set():
                        chunk = raw.read(block_bytes)
                        if bar is not None:
                            bar.update(len(chunk))
                        if not chunk:
                            break
                        q.put(chunk)
            q.put(None)
        except (EOFError, zlib.error, OSError, gzip.BadGzipFile) as err:
            q.put(err)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise InputError(f"cannot decompress: {item}", path)
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def _row_blocks(path: Path, block_bytes: int, bar: tqdm | None) -> Iterator[bytes]:
    """Re-cut decompressed data into blocks of whole CSV rows (never inside a quoted field).

    Pieces are gathered in a list and joined once per block (no quadratic re-copying).
    """
    pieces: list[bytes] = []
    size = quotes = 0  # bytes and quote characters held in ``pieces``
    for piece in _raw_blocks(path, block_bytes, bar):
        pieces.append(piece)
        size += len(piece)
        quotes += piece.count(b'"')
        if size < block_bytes:
            continue
        buf = b"".join(pieces)
        cut = buf.rfind(b"\n")
        tail_quotes = buf.count(b'"', cut) if cut >= 0 else 0
        while cut >= 0 and (quotes - tail_quotes) % 2:
            # The prefix ends a row only if it holds an even number of quote characters.
            prev = buf.rfind(b"\n", 0, cut)
            tail_quotes += buf.count(b'"', prev if prev >= 0 else 0, cut)
            cut = prev
        if cut < 0:
            pieces, size = [buf], len(buf)
            continue
        yield buf[: cut + 1]
        rest = buf[cut + 1 :]
        pieces, size, quotes = [rest], len(rest), tail_quotes
    buf = b"".join(pieces)
    if buf.strip():
        if quotes % 2:
            raise InputError("file ends inside a quoted field (truncated?)", path)
        yield buf if buf.endswith(b"\n") else buf + b"\n"


def _parse_datetimes(raw: pl.Series) -> pl.Series:
    """MIMIC's ``YYYY-MM-DD HH:MM:SS`` first (one pass); other formats only for the rows that need them."""
    parsed = raw.str.strptime(pl.Datetime("us"), DATETIME_FORMATS[0], strict=False)
    if parsed.null_count() > raw.null_count():
        for fmt in DATETIME_FORMATS[1:]:
            parsed = parsed.fill_null(raw.str.strptime(pl.Datetime("us"), fmt, strict=False))
    return parsed


def _typed(df: pl.DataFrame, spec: TableSpec, path: Path) -> pl.DataFrame:
    """Cast the typed columns of ``spec``; an unparseable value is an error naming column, value and row."""
    raw = df.select([*spec.ints, *spec.floats, *spec.datetimes]).with_columns(pl.all().str.strip_chars())
    out = df.with_columns(
        [raw[c].cast(pl.Int64, strict=False).alias(c) for c in spec.ints]
        + [raw[c].cast(pl.Float64, strict=False).alias(c) for c in spec.floats]
        + [_parse_datetimes(raw[c]).alias(c) for c in spec.datetimes]
    )
    for c in (*spec.ints, *spec.floats, *spec.datetimes):
        if out[c].null_count() == raw[c].null_count() + (raw[c] == "").sum():
            continue
        bad = out[c].is_null() & raw[c].is_not_null() & (raw[c] != "")
        i = int(bad.arg_max())
        kind = "timestamp" if c in spec.datetimes else "number"
        raise InputError(f"column '{c}' has an unparseable {kind} {df[c][i]!r} at data row {df[ROW][i]}", path)
    return out


def read_header(path: Path) -> list[str]:
    """The column names on the first line; errors for empty or corrupt files."""
    try:
        opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
        with opener(path, "rb") as fh:
            line = fh.readline()
    except (EOFError, OSError, zlib.error) as err:
        raise InputError(f"cannot read header: {err}", path) from None
    if not line.strip():
        raise InputError("file is empty (no header line)", path)
    return [c.strip().strip('"') for c in line.decode("utf-8", "replace").rstrip("\r\n").split(",")]


def scan_table(
    path: Path,
    spec: TableSpec,
    keep: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
    block_bytes: int = BLOCK_BYTES,
    progress: bool = False,
) -> tuple[pl.DataFrame, int]:
    """Read ``path`` block by block; returns (rows kept by ``keep``, rows read).

    Only the columns of ``spec`` are parsed and typed; ``keep`` filters each typed block.
    """
    header = read_header(path)
    missing = [c for c in spec.columns if c not in header]
    if missing:
        raise InputError(f"missing column(s) {', '.join(missing)}; the header has: {', '.join(header)}", path)
    # Project by position in file order and name the result positionally (robust across polars versions).
    by_pos = sorted((header.index(c), c) for c in spec.columns)
    indices = [i for i, _ in by_pos]
    names = [c for _, c in by_pos]
    kept: list[pl.DataFrame] = []
    n_rows = 0
    first = True
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=path.name, disable=not progress, leave=False)
    try:
        for block in _row_blocks(path, block_bytes, bar):
            if first:
                block = block.split(b"\n", 1)[1] if b"\n" in block else b""
                first = False
                if not block.strip():
                    continue
            try:
                df = pl.read_csv(
                    io.BytesIO(block),
                    has_header=False,
                    columns=indices,
                    infer_schema=False,
                    quote_char='"',
                )
                df.columns = names
            except Exception as err:  # polars raises ComputeError/ShapeError for malformed CSV
                raise InputError(f"malformed CSV near data row {n_rows + 1}: {err}", path) from None
            df = df.with_row_index(ROW, offset=n_rows + 1)
            n_rows += df.height
            kept.append(_filter(df, spec, keep, path))
    finally:
        bar.close()
    if not kept:
        empty = pl.DataFrame(schema={ROW: pl.UInt32, **{c: pl.String for c in spec.columns}})
        kept.append(_filter(empty, spec, keep, path))
    return pl.concat(kept, how="vertical_relaxed").drop(ROW), n_rows


def _filter(df: pl.DataFrame, spec: TableSpec, keep, path: Path) -> pl.DataFrame:
    if keep is None:
        return _typed(df, spec, path)
    if spec.keys is None:
        return keep(_typed(df, spec, path))
    first = spec.subset(set(spec.keys))
    rest = spec.subset(set(spec.columns) - set(spec.keys))
    return _typed(keep(_typed(df, first, path)), rest, path)
