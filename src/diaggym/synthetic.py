"""Scale the open MIMIC-IV demo up into a larger, format-identical synthetic folder.

Why this exists: the demo has 100 patients (~107k lab rows), far too small to
tell whether preprocessing is fast and memory-light at the scale of the real
MIMIC-IV, which needs a credentialed licence and cannot be bundled or used in
CI.  :func:`scale_up` writes a MIMIC-IV-layout folder that holds ``factor``
copies of every per-patient table, so benchmarks and load tests can run on
open data with realistic volume, the real column layout and the real textual
formats (the copies are not new information: values and distributions are the
demo's).

Scheme (documented because tests and benchmarks rely on it):

* Copy ``k = 0`` is the demo itself: ids, times and every byte of every row are
  unchanged, so a factor-1 output equals the input.
* Copy ``k >= 1`` adds ``k * ID_STRIDE`` (``ID_STRIDE = 10**9``) to every
  integer id column (``subject_id``, ``hadm_id``, ``stay_id``, ``specimen_id``,
  ``micro_specimen_id``, ``labevent_id``, ``microevent_id``, ...).  All MIMIC-IV
  ids are below ``10**9``, so ids never collide across copies or with the
  originals, and ``id // ID_STRIDE`` is the copy, ``id % ID_STRIDE`` the
  original id.  Composite string ids of the form ``"<subject_id>-<rest>"``
  (``poe_id``, ``emar_id``, ``note_id``) get their subject prefix shifted the
  same way.  Empty ids stay empty; provider ids and item ids (dictionary keys)
  are unchanged.
* Every datetime/date column of copy ``k`` (``charttime``, ``storetime``,
  ``admittime``, ``dischtime``, ``deathtime``, ``edregtime``, ``edouttime``,
  ``intime``, ``outtime``, ``chartdate``, ``storedate``, ``transfertime``,
  ``dod``, and any other column whose name ends in ``time``/``date``) is shifted
  by the same whole number of weeks, drawn deterministically from ``(seed, k)``
  (non-zero, at most ~20 years either way).  Whole days keep time of day and
  every interval inside a patient's record intact; whole weeks also keep the
  day of the week.  ``patients.anchor_year`` moves by the nearest whole number
  of years so ages stay roughly consistent with the shifted dates.
* Dictionary tables (those without a ``subject_id`` column: ``d_labitems``,
  ``d_icd_diagnoses``, ...) are copied once, byte for byte.
* ``LICENSE*``/``README*`` files at the input root are copied so the synthetic
  folder carries the demo's licence; ``SYNTHETIC.json`` records how it was made.

Only id and datetime columns are parsed; every other column is read and written
as text, so numbers, flags and free-text comments (with embedded commas,
quotes, newlines or trailing spaces) come out exactly as they went in.  Rows of
one table are written copy after copy into one gzip stream (level 1), with
compression on a background thread overlapping the next copy's formatting.
The whole folder is built beside ``out_dir`` and renamed into place only when
complete (:func:`diaggym.atomic.atomic_dir`).
"""

from __future__ import annotations

import gzip
import io
import json
import queue
import random
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from tqdm import tqdm

from diaggym.atomic import atomic_dir
from diaggym.errors import InputError

__all__ = [
    "DICTIONARY_TABLES",
    "ID_STRIDE",
    "PER_PATIENT_TABLES",
    "REQUIRED_TABLES",
    "copy_day_offset",
    "scale_up",
]

#: Added ``k`` times to every integer id of copy ``k``; all MIMIC-IV ids are below it.
ID_STRIDE = 10**9

#: Tables (relative path without ``.csv.gz``) that the demo has and the output must have.
PER_PATIENT_TABLES: tuple[str, ...] = (
    "hosp/patients",
    "hosp/admissions",
    "hosp/services",
    "hosp/diagnoses_icd",
    "hosp/labevents",
    "hosp/microbiologyevents",
    "ed/edstays",
    "ed/triage",
    "ed/vitalsign",
)
DICTIONARY_TABLES: tuple[str, ...] = ("hosp/d_labitems", "hosp/d_icd_diagnoses")
REQUIRED_TABLES: tuple[str, ...] = PER_PATIENT_TABLES + DICTIONARY_TABLES

#: Integer identifier columns that are made unique per copy.
ID_COLUMNS = frozenset(
    {
        "subject_id",
        "hadm_id",
        "stay_id",
        "specimen_id",
        "micro_specimen_id",
        "labevent_id",
        "microevent_id",
        "transfer_id",
        "pharmacy_id",
    }
)
#: String identifiers ``"<subject_id>-<rest>"`` whose subject prefix is shifted.
COMPOSITE_ID_COLUMNS = frozenset({"poe_id", "emar_id", "note_id"})
#: Datetime/date columns known by name; others are recognised by a ``time``/``date`` suffix.
TIME_COLUMNS = frozenset(
    {
        "charttime",
        "storetime",
        "admittime",
        "dischtime",
        "deathtime",
        "edregtime",
        "edouttime",
        "intime",
        "outtime",
        "chartdate",
        "storedate",
        "transfertime",
        "dod",
    }
)
_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d")
_MAX_SHIFT_WEEKS = 20 * 52  # copies land within ~20 years of the demo's (already shifted) dates
_DAYS_PER_YEAR = 365.2425
_GZIP_LEVEL = 1


def copy_day_offset(seed: int, k: int) -> int:
    """Days that copy ``k`` is shifted by: 0 for the original, else a non-zero whole number of weeks."""
    if k == 0:
        return 0
    rng = random.Random(f"diaggym.synthetic:{seed}:{k}")
    return 7 * rng.choice((-1, 1)) * rng.randint(1, _MAX_SHIFT_WEEKS)


def _year_offset(days: int) -> int:
    return round(days / _DAYS_PER_YEAR)


def _is_time_column(name: str) -> bool:
    return name in TIME_COLUMNS or name.endswith(("time", "date"))


@dataclass
class _Prepared:
    """One per-patient table, read once, with its id and time columns parsed."""

    frame: pl.DataFrame  # original text columns plus parsed helper columns
    columns: list[str]
    ids: list[str] = field(default_factory=list)
    composite_ids: list[str] = field(default_factory=list)
    times: dict[str, str] = field(default_factory=dict)  # column -> strftime format
    anchor_year: bool = False


def _helper(name: str) -> str:
    return f"__synthetic_{name}"


def _read_text_table(path: Path) -> pl.DataFrame:
    try:
        return pl.read_csv(path, infer_schema=False)
    except Exception as exc:  # polars raises several error types for bad gzip/CSV
        raise InputError(f"cannot read table: {exc}", path) from exc


def _prepare(path: Path) -> _Prepared:
    df = _read_text_table(path)
    prep = _Prepared(frame=df, columns=list(df.columns))
    helpers: list[pl.Series] = []
    for name in df.columns:
        col = df[name]
        if name in ID_COLUMNS:
            parsed = col.cast(pl.Int64, strict=False)
            if parsed.null_count() != col.null_count():
                bad = col.filter(parsed.is_null() & col.is_not_null()).head(1).to_list()
                raise InputError(f"column {name!r} has a non-integer id {bad[0]!r}", path)
            top = parsed.max()
            if top is not None and (top >= ID_STRIDE or parsed.min() < 0):  # type: ignore[operator]
                raise InputError(f"column {name!r} has ids outside [0, {ID_STRIDE}) (max {top})", path)
            prep.ids.append(name)
            helpers.append(parsed.alias(_helper(name)))
        elif name in COMPOSITE_ID_COLUMNS:
            parts = col.str.extract_groups(r"^(\d+)(-.*)$")
            prefix = parts.struct.field("1").cast(pl.Int64, strict=False)
            if prefix.null_count() != col.null_count():
                raise InputError(f"column {name!r} is not of the form '<subject_id>-<rest>'", path)
            prep.composite_ids.append(name)
            helpers.append(prefix.alias(_helper(name)))
            helpers.append(parts.struct.field("2").alias(_helper(name) + "_rest"))
        elif _is_time_column(name):
            fmt, parsed = _parse_times(col, path, name)
            prep.times[name] = fmt
            helpers.append(parsed.alias(_helper(name)))
        elif name == "anchor_year":
            parsed = col.cast(pl.Int64, strict=False)
            if parsed.null_count() != col.null_count():
                raise InputError("column 'anchor_year' has a non-integer year", path)
            prep.anchor_year = True
            helpers.append(parsed.alias(_helper(name)))
    prep.frame = df.with_columns(helpers) if helpers else df
    return prep


def _parse_times(col: pl.Series, path: Path, name: str) -> tuple[str, pl.Series]:
    """Parse a datetime column with the one format that reproduces every value exactly."""
    if col.null_count() == len(col):
        return _TIME_FORMATS[0], col.cast(pl.Datetime("us"), strict=False)
    for fmt in _TIME_FORMATS:
        parsed = col.str.strptime(pl.Datetime("us"), fmt, strict=False)
        if parsed.null_count() != col.null_count():
            continue
        if (parsed.dt.strftime(fmt) == col).all():
            return fmt, parsed
    example = col.drop_nulls().head(1).to_list()
    raise InputError(
        f"column {name!r} is not a datetime in one of the formats {list(_TIME_FORMATS)} (e.g. {example[0]!r})",
        path,
    )


def _copy_exprs(prep: _Prepared, k: int, days: int) -> list[pl.Expr]:
    """Expressions that turn the prepared frame into copy ``k`` with the original column order."""
    id_shift = k * ID_STRIDE
    years = _year_offset(days)
    exprs: list[pl.Expr] = []
    for name in prep.columns:
        h = _helper(name)
        if k == 0:
            exprs.append(pl.col(name))
        elif name in prep.ids:
            exprs.append((pl.col(h) + id_shift).cast(pl.String).alias(name))
        elif name in prep.composite_ids:
            exprs.append(pl.concat_str([(pl.col(h) + id_shift).cast(pl.String), pl.col(h + "_rest")]).alias(name))
        elif name in prep.times:
            shifted = pl.col(h) + pl.duration(days=days)
            exprs.append(shifted.dt.strftime(prep.times[name]).alias(name))
        elif name == "anchor_year" and prep.anchor_year:
            exprs.append((pl.col(h) + years).cast(pl.String).alias(name))
        else:
            exprs.append(pl.col(name))
    return exprs


class _GzipWriter:
    """Append CSV chunks to one gzip stream on a background thread (zlib releases the GIL)."""

    def __init__(self, path: Path) -> None:
        self._raw = open(path, "wb")  # noqa: SIM115 - closed in close()
        # mtime=0: identical inputs give identical bytes.
        self._gz = gzip.GzipFile(filename="", mode="wb", compresslevel=_GZIP_LEVEL, fileobj=self._raw, mtime=0)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"gzip:{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._gz.write(chunk)
                except BaseException as exc:  # re-raised in the caller's thread
                    self._error = exc

    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            self._gz.close()
        finally:
            self._raw.close()


def _write_copies(prep: _Prepared, dest: Path, factor: int, offsets: list[int], bar: tqdm) -> int:
    writer = _GzipWriter(dest)
    rows = 0
    try:
        for k in range(factor):
            chunk = prep.frame.select(_copy_exprs(prep, k, offsets[k]))
            buf = io.BytesIO()
            chunk.write_csv(buf, include_header=(k == 0))
            writer.write(buf.getvalue())
            rows += chunk.height
            bar.update(chunk.height)
    finally:
        writer.close()
    return rows


def _discover_tables(input_dir: Path) -> list[str]:
    """All ``<module>/<table>.csv.gz`` under the input root, required ones checked first."""
    for rel in REQUIRED_TABLES:
        path = input_dir / f"{rel}.csv.gz"
        if not path.is_file():
            raise InputError(f"required table {rel}.csv.gz is missing", path)
    found = {str(p.relative_to(input_dir))[: -len(".csv.gz")] for p in input_dir.glob("*/*.csv.gz") if p.is_file()}
    return sorted(found)


def _has_subject_id(path: Path) -> bool:
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
            header = fh.readline()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read table header: {exc}", path) from exc
    return "subject_id" in header.rstrip("\r\n").split(",")


def _copy_root_docs(input_dir: Path, out: Path) -> list[str]:
    copied = []
    for pattern in ("LICENSE*", "README*"):
        for p in sorted(input_dir.glob(pattern)):
            if p.is_file():
                shutil.copy2(p, out / p.name)
                copied.append(p.name)
    return copied


def _count_rows(tables: Iterable[tuple[str, Path]]) -> int:
    total = 0
    for _, path in tables:
        total += pl.scan_csv(path, infer_schema=False).select(pl.len()).collect().item()
    return total


def scale_up(
    input_dir: str | Path,
    out_dir: str | Path,
    factor: int,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write a MIMIC-IV-layout folder at ``out_dir`` holding ``factor`` copies of ``input_dir``.

    See the module docstring for the id and time-shift scheme.  Returns a summary
    ``{"factor", "seed", "id_stride", "day_offsets", "rows", "bytes", "seconds", ...}``
    where ``rows``/``bytes`` map each table (e.g. ``"hosp/labevents"``) to its output
    row count / compressed size.  Raises :class:`InputError` naming the path when
    the input folder or a required table is missing or unreadable.
    """
    start = time.perf_counter()
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    input_dir = Path(input_dir)
    out_dir = Path(out_dir)
    if not input_dir.is_dir():
        raise InputError("input folder does not exist or is not a folder", input_dir)
    src_root, dst_root = input_dir.resolve(), out_dir.resolve()
    if dst_root == src_root or src_root in dst_root.parents or dst_root in src_root.parents:
        raise ValueError(f"out_dir {out_dir} must not contain or be inside input_dir {input_dir}")

    tables = _discover_tables(input_dir)
    paths = {t: input_dir / f"{t}.csv.gz" for t in tables}
    per_patient = [(t, paths[t]) for t in tables if _has_subject_id(paths[t])]
    dictionaries = [t for t in tables if t not in {name for name, _ in per_patient}]
    for rel in PER_PATIENT_TABLES:  # a required per-patient table without subject_id is malformed
        if rel not in {name for name, _ in per_patient}:
            raise InputError("table has no subject_id column", input_dir / f"{rel}.csv.gz")

    offsets = [copy_day_offset(seed, k) for k in range(factor)]
    rows: dict[str, int] = {}
    sizes: dict[str, int] = {}
    with atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the data folder should be readable like its source
        for rel in dictionaries:
            src, dest = input_dir / f"{rel}.csv.gz", tmp / f"{rel}.csv.gz"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            rows[rel] = pl.scan_csv(src, infer_schema=False).select(pl.len()).collect().item()
            sizes[rel] = dest.stat().st_size
        total = _count_rows(per_patient) * factor
        with tqdm(total=total, unit="row", unit_scale=True, desc=f"scale-up x{factor}", disable=not progress) as bar:
            for rel, src in per_patient:
                bar.set_postfix_str(rel)
                prep = _prepare(src)
                dest = tmp / f"{rel}.csv.gz"
                dest.parent.mkdir(parents=True, exist_ok=True)
                rows[rel] = _write_copies(prep, dest, factor, offsets, bar)
                sizes[rel] = dest.stat().st_size
                del prep
        docs = _copy_root_docs(input_dir, tmp)
        summary = {
            "factor": factor,
            "seed": seed,
            "source": str(input_dir),
            "id_stride": ID_STRIDE,
            "day_offsets": offsets,
            "per_patient_tables": [name for name, _ in per_patient],
            "dictionary_tables": dictionaries,
            "copied_docs": docs,
            "rows": rows,
            "bytes": sizes,
        }
        (tmp / "SYNTHETIC.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    summary["out_dir"] = str(out_dir)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary
