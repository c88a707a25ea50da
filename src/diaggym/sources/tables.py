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

    @property
    def columns(self) -> list[str]:
        return [*self.ints, *self.floats, *self.datetimes, *self.strings]


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
    """Re-cut decompressed data into blocks of whole CSV rows (never inside a quoted field)."""
    carry = b""
    quotes_in_carry = 0
    for piece in _raw_blocks(path, block_bytes, bar):
        buf = carry + piece
        if len(buf) < block_bytes:
            carry, quotes_in_carry = buf, quotes_in_carry + piece.count(b'"')
            continue
        total_quotes = quotes_in_carry + piece.count(b'"')
        cut = buf.rfind(b"\n")
        while cut >= 0:
            # The prefix ends a row only if it holds an even number of quote characters.
            if (total_quotes - buf.count(b'"', cut)) % 2 == 0:
                break
            cut = buf.rfind(b"\n", 0, cut)
        if cut < 0:
            carry, quotes_in_carry = buf, total_quotes
            continue
        yield buf[: cut + 1]
        carry = buf[cut + 1 :]
        quotes_in_carry = carry.count(b'"')
    if carry.strip():
        if quotes_in_carry % 2:
            raise InputError("file ends inside a quoted field (truncated?)", path)
        yield carry if carry.endswith(b"\n") else carry + b"\n"


def _parse_datetimes(raw: pl.Series) -> pl.Series:
    """MIMIC's ``YYYY-MM-DD HH:MM:SS`` first (one pass); other formats only for the rows that need them."""
    parsed = raw.str.strptime(pl.Datetime("us"), DATETIME_FORMATS[0], strict=False)
    if parsed.null_count() > raw.null_count():
        for fmt in DATETIME_FORMATS[1:]:
            parsed = parsed.fill_null(raw.str.strptime(pl.Datetime("us"), fmt, strict=False))
    return parsed


def _typed(df: pl.DataFrame, spec: TableSpec, path: Path, first_row: int) -> pl.DataFrame:
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
        raise InputError(f"column '{c}' has an unparseable {kind} {df[c][i]!r} at data row {first_row + i + 1}", path)
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
            df = _typed(df, spec, path, n_rows)
            n_rows += df.height
            kept.append(keep(df) if keep is not None else df)
    finally:
        bar.close()
    if not kept:
        schema = {c: pl.String for c in spec.columns}
        empty = _typed(pl.DataFrame(schema=schema), spec, path, 0)
        return (keep(empty) if keep is not None else empty), 0
    return pl.concat(kept, how="vertical_relaxed"), n_rows
