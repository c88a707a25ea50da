"""Tests for :mod:`diaggym.synthetic`: the scaled-up demo must look exactly like MIMIC-IV.

Benchmarks trust these folders to stand in for the real data, so the tests pin
the properties that make that valid: row counts scale, the text format is
byte-for-byte the demo's, copies are distinct patients (disjoint ids) and the
time shift keeps every interval.  Copy 0 keeps the original ids and times
(it *is* the demo); copy k >= 1 adds ``k * ID_STRIDE`` to ids and a per-copy
whole-week offset to every datetime.
"""

from __future__ import annotations

import gzip
import shutil
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from diaggym.errors import InputError
from diaggym.synthetic import (
    DICTIONARY_TABLES,
    ID_COLUMNS,
    ID_STRIDE,
    PER_PATIENT_TABLES,
    copy_day_offset,
    scale_up,
)

DEMO = Path(__file__).resolve().parents[1] / "data" / "mimic-iv-demo"
FACTOR = 2


def _text(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


def _read(path: Path) -> pl.DataFrame:
    return pl.read_csv(path, infer_schema=False)


def _time_columns(df: pl.DataFrame) -> list[str]:
    return [c for c in df.columns if c.endswith(("time", "date")) or c == "dod"]


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic") / "mimic-iv-x2"
    summary = scale_up(DEMO, out, FACTOR, seed=0, progress=False)
    return out, summary


def _split(scaled_dir: Path, table: str) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(original, copy 0, copy 1) of one per-patient table."""
    orig = _read(DEMO / f"{table}.csv.gz")
    out = _read(scaled_dir / f"{table}.csv.gz")
    n = orig.height
    return orig, out.slice(0, n), out.slice(n, n)


def test_summary_and_layout(scaled: tuple[Path, dict]) -> None:
    out, summary = scaled
    assert summary["factor"] == FACTOR
    assert summary["id_stride"] == ID_STRIDE
    assert summary["day_offsets"][0] == 0
    assert summary["seconds"] >= 0
    assert (out / "SYNTHETIC.json").is_file()
    for lic in DEMO.glob("LICENSE*"):
        assert (out / lic.name).read_bytes() == lic.read_bytes()
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary build folder left behind"


@pytest.mark.parametrize("table", PER_PATIENT_TABLES)
def test_per_patient_table_scaled(scaled: tuple[Path, dict], table: str) -> None:
    out, summary = scaled
    src_text = _text(DEMO / f"{table}.csv.gz")
    out_text = _text(out / f"{table}.csv.gz")
    # Same header; copy 0 is the original byte for byte (quoting, empty fields, trailing spaces).
    assert out_text.split(b"\n", 1)[0] == src_text.split(b"\n", 1)[0]
    assert out_text.startswith(src_text)

    orig, copy0, copy1 = _split(out, table)
    assert summary["rows"][table] == FACTOR * orig.height
    assert _read(out / f"{table}.csv.gz").height == FACTOR * orig.height
    assert copy0.equals(orig)

    # Ids: shifted by the stride, nulls kept, copies disjoint.
    for col in set(orig.columns) & ID_COLUMNS:
        o = orig[col].cast(pl.Int64)
        c1 = copy1[col].cast(pl.Int64)
        assert c1.is_null().equals(o.is_null()), col
        assert (c1 - o).drop_nulls().unique().to_list() in ([ID_STRIDE], []), col
        assert set(c1.drop_nulls()).isdisjoint(set(o.drop_nulls())), col

    # Times: every datetime column moved by the copy's offset, format unchanged.
    days = summary["day_offsets"][1]
    assert days != 0 and days % 7 == 0
    for col in _time_columns(orig):
        fmt = "%Y-%m-%d" if orig[col].drop_nulls().str.len_chars().max() == 10 else "%Y-%m-%d %H:%M:%S"
        o = orig[col].str.strptime(pl.Datetime, fmt)
        c1 = copy1[col].str.strptime(pl.Datetime, fmt)
        assert c1.is_null().equals(o.is_null()), col
        assert ((c1 - o).drop_nulls() == timedelta(days=days)).all(), col
        assert c1.dt.strftime(fmt).equals(copy1[col]), col

    # Values: every other column identical.
    changed = (set(orig.columns) & ID_COLUMNS) | set(_time_columns(orig)) | {"anchor_year"}
    values = [c for c in orig.columns if c not in changed]
    assert copy1.select(values).equals(orig.select(values))


def test_subject_ids_disjoint_across_copies(scaled: tuple[Path, dict]) -> None:
    out, _ = scaled
    _, copy0, copy1 = _split(out, "hosp/patients")
    assert copy0["subject_id"].n_unique() == copy1["subject_id"].n_unique() == 100
    assert set(copy0["subject_id"]).isdisjoint(set(copy1["subject_id"]))
    labs = _read(out / "hosp/labevents.csv.gz")
    assert labs["labevent_id"].is_unique().all()


def test_intervals_preserved_in_admissions(scaled: tuple[Path, dict]) -> None:
    out, _ = scaled
    orig, _, copy1 = _split(out, "hosp/admissions")

    def stay_length(df: pl.DataFrame) -> pl.Series:
        return df.select(
            pl.col("dischtime").str.to_datetime("%Y-%m-%d %H:%M:%S")
            - pl.col("admittime").str.to_datetime("%Y-%m-%d %H:%M:%S")
        ).to_series()

    assert stay_length(copy1).equals(stay_length(orig))
    # time of day unchanged
    assert copy1["admittime"].str.slice(11).equals(orig["admittime"].str.slice(11))


def test_anchor_year_follows_shift(scaled: tuple[Path, dict]) -> None:
    out, summary = scaled
    orig, _, copy1 = _split(out, "hosp/patients")
    years = round(summary["day_offsets"][1] / 365.2425)
    assert (copy1["anchor_year"].cast(pl.Int64) - orig["anchor_year"].cast(pl.Int64) == years).all()
    assert copy1["anchor_year_group"].equals(orig["anchor_year_group"])


@pytest.mark.parametrize("table", DICTIONARY_TABLES)
def test_dictionary_tables_copied_once(scaled: tuple[Path, dict], table: str) -> None:
    out, summary = scaled
    assert (out / f"{table}.csv.gz").read_bytes() == (DEMO / f"{table}.csv.gz").read_bytes()
    assert summary["rows"][table] == _read(DEMO / f"{table}.csv.gz").height


def test_day_offsets_deterministic_whole_weeks() -> None:
    offsets = [copy_day_offset(0, k) for k in range(1, 50)]
    assert offsets == [copy_day_offset(0, k) for k in range(1, 50)]
    assert all(d != 0 and d % 7 == 0 and abs(d) <= 21 * 365 for d in offsets)
    assert offsets != [copy_day_offset(1, k) for k in range(1, 50)]


def _demo_without(tmp_path: Path, table: str) -> Path:
    """A demo copy (symlinked files) lacking one table."""
    root = tmp_path / "demo"
    for src in DEMO.rglob("*"):
        if src.is_file() and src.relative_to(DEMO).as_posix() != f"{table}.csv.gz":
            dest = root / src.relative_to(DEMO)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(src)
    return root


@pytest.mark.parametrize("table", ["hosp/labevents", "ed/vitalsign", "hosp/d_labitems"])
def test_missing_table_raises_input_error(tmp_path: Path, table: str) -> None:
    root = _demo_without(tmp_path, table)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=table.split("/")[1]) as info:
        scale_up(root, out, 2, progress=False)
    assert info.value.path is not None and info.value.path.endswith(f"{table}.csv.gz")
    assert not out.exists()


def test_missing_input_folder_raises_input_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match="nope"):
        scale_up(missing, tmp_path / "out", 2, progress=False)


def test_failure_keeps_previous_output(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    shutil.copytree(DEMO, root)
    (root / "hosp" / "services.csv.gz").write_bytes(b"not gzip")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    with pytest.raises(InputError, match="services"):
        scale_up(root, out, 2, progress=False)
    assert (out / "keep.txt").read_text() == "previous"
    assert not list(tmp_path.glob(".out.*")), "temporary build folder left behind"


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        scale_up(DEMO, tmp_path / "out", 0, progress=False)
    with pytest.raises(ValueError):
        scale_up(DEMO, DEMO / "inside", 2, progress=False)
