"""The streaming CSV reader (sources/tables.py), tested directly on small files with tiny blocks."""

from __future__ import annotations

import gzip
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from diaggym.errors import InputError
from diaggym.sources.tables import TableSpec, find_table, read_header, scan_table

ROWS = [(i, f"{i * 1.5}", f"2180-01-0{1 + i % 9} 0{i % 10}:00:00", f'"line one\nline ""{i}"", two"') for i in range(40)]
CSV = "id,val,t,comments\n" + "".join(f"{a},{b},{c},{d}\n" for a, b, c, d in ROWS)
SPEC = TableSpec(ints=("id",), floats=("val",), datetimes=("t",), strings=("comments",))


def _write(path: Path, text: str, gz: bool = True) -> Path:
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("block_bytes", [16, 97, 1 << 20])
def test_blocks_never_cut_inside_a_quoted_field(tmp_path, block_bytes):
    df, n = scan_table(_write(tmp_path / "t.csv.gz", CSV), SPEC, block_bytes=block_bytes)
    assert n == 40 and df.height == 40
    assert df["id"].to_list() == list(range(40))
    assert df["comments"][7] == 'line one\nline "7", two'
    assert df["val"][3] == 4.5 and df.schema["t"] == pl.Datetime("us")


def test_concatenated_gzip_members_and_plain_csv(tmp_path):
    head, tail = CSV[:200].rsplit("\n", 1)[0] + "\n", None
    tail = CSV[len(head) :]
    path = tmp_path / "multi.csv.gz"
    path.write_bytes(gzip.compress(head.encode()) + gzip.compress(tail.encode()))
    assert scan_table(path, SPEC, block_bytes=64)[0].height == 40
    assert scan_table(_write(tmp_path / "p.csv", CSV, gz=False), SPEC)[0].height == 40


def test_datetime_formats_and_empty_values(tmp_path):
    text = "id,t\n1,2180-01-01 10:00:00\n2,2180-01-01 10:00:00.250\n3,2180-01-02\n4,\n"
    df, _ = scan_table(_write(tmp_path / "d.csv.gz", text), TableSpec(ints=("id",), datetimes=("t",)))
    assert df["t"].to_list() == [
        datetime(2180, 1, 1, 10), datetime(2180, 1, 1, 10, 0, 0, 250000), datetime(2180, 1, 2), None,
    ]  # fmt: skip


def test_bad_number_names_column_value_and_data_row_across_blocks(tmp_path):
    text = CSV.replace("\n33,", "\nthirty-three,", 1)
    with pytest.raises(InputError, match=r"column 'id' has an unparseable number 'thirty-three' at data row 34"):
        scan_table(_write(tmp_path / "b.csv.gz", text), SPEC, block_bytes=64)


def test_keep_filters_each_block_and_keys_defer_typing(tmp_path):
    bad_val = CSV.replace("\n5,7.5,", "\n5,oops,", 1)
    path = _write(tmp_path / "k.csv.gz", bad_val)
    spec = TableSpec(ints=("id",), floats=("val",), strings=("comments",), keys=("id",))
    seen = []

    def keep(d: pl.DataFrame) -> pl.DataFrame:
        assert d.schema["id"] == pl.Int64  # the key is typed before the filter
        seen.append(d.height)
        return d.filter(pl.col("id") >= 10)

    df, n = scan_table(path, spec, keep, block_bytes=64)
    assert n == 40 and df["id"].to_list() == list(range(10, 40)) and sum(seen) == 40 and len(seen) > 1
    # The same bad value in a row the filter keeps is an error.
    with pytest.raises(InputError, match="column 'val' has an unparseable number 'oops'"):
        scan_table(path, spec, lambda d: d, block_bytes=64)


def test_header_only_file_gives_an_empty_typed_frame(tmp_path):
    df, n = scan_table(_write(tmp_path / "h.csv.gz", "id,val,t,comments\n"), SPEC)
    assert n == 0 and df.height == 0 and df.schema["id"] == pl.Int64 and df.schema["t"] == pl.Datetime("us")


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("empty.csv.gz", None, "file is empty"),
        ("cols.csv.gz", "id,other\n1,2\n", r"missing column\(s\) val, t, comments; the header has: id, other"),
        ("quote.csv.gz", 'id,val,t,comments\n1,2,2180-01-01,"never closed\n', "ends inside a quoted field"),
    ],
)
def test_bad_files_raise_input_errors_naming_the_file(tmp_path, name, data, message):
    path = _write(tmp_path / name, data or "")
    with pytest.raises(InputError, match=message) as err:
        scan_table(path, SPEC)
    assert name in str(err.value)


def test_truncated_gzip(tmp_path):
    head, body = CSV.split("\n", 1)
    blob = gzip.compress((head + "\n" + body * 50).encode())
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="cannot decompress"):
        scan_table(path, SPEC, block_bytes=256)


def test_find_table_and_read_header(tmp_path):
    assert find_table(tmp_path, "x", required=False) is None
    with pytest.raises(InputError, match=r"missing table x\.csv\.gz"):
        find_table(tmp_path, "x")
    plain = _write(tmp_path / "x.csv", CSV, gz=False)
    assert find_table(tmp_path, "x") == plain
    gz = _write(tmp_path / "x.csv.gz", CSV)
    assert find_table(tmp_path, "x") == gz  # the compressed table wins
    assert read_header(gz) == ["id", "val", "t", "comments"]
