"""MIMIC-IV → cases (contract 1), streaming so that the full database fits one machine.

One case per hospital admission.  Rules, as in the reference work:

* only exams charted in the ``window_hours`` (24) before admission are kept;
  emergency-department labs often carry no ``hadm_id``, so rows are matched to
  an admission by patient and time (a row charted to another admission is not
  taken; a row that fits two admissions goes to the one it names, else the
  nearest admission after it);
* lab analytes measured on one specimen are merged into MIMIC-CDM panels
  (:mod:`diaggym.catalog`); an analyte in no panel is its own exam named by its
  label (with the fluid when it is not blood);
* microbiology: one exam per specimen and test, result text = specimen, each
  organism with its susceptibilities, and the comments;
* physical exam (group 0): ED triage vital signs (first ED vital-sign row when
  triage has none), plus the note's Physical Exam section when notes exist;
* profile: demographics, service, triage chief complaint (+ the verbatim note
  header when ``note/discharge.csv.gz`` exists);
* final diagnosis: ``diagnoses_icd`` long titles by ``seq_num`` (the note's
  Discharge Diagnosis section when notes exist);
* the first occurrence of each exam per case is kept; exams at the same time
  form a group, groups in time order;
* exclusions: no diagnosis, no physical exam, no exam in the window, diagnosis
  already stated in the history.  Every dropped case and row is counted.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
from tqdm.auto import tqdm

from diaggym.cases import LAB_KEYS, SEP, Case, Exam, LabItem, Profile
from diaggym.catalog import PanelCatalog
from diaggym.errors import InputError
from diaggym.sources import FilterLog, SourceResult
from diaggym.sources.tables import TableSpec, find_table, scan_table

SOURCE = "mimic-iv"
BLOOD_FLUIDS = {"blood", "plasma", "serum"}
KIND_ORDER = {"physical": 0, "lab": 1, "microbiology": 2, "radiology": 3, "other": 4}

VITALS = (  # (column, label, unit)
    ("temperature", "Temperature", "°F"),
    ("heartrate", "Heart Rate", "bpm"),
    ("resprate", "Respiratory Rate", "breaths/min"),
    ("o2sat", "O2 Saturation", "%"),
    ("sbp", "Systolic Blood Pressure", "mmHg"),
    ("dbp", "Diastolic Blood Pressure", "mmHg"),
    ("pain", "Pain Score", ""),
)


# --------------------------------------------------------------------------- text helpers
def _one_line(s: str | None) -> str | None:
    """Collapse whitespace to one line; ``None`` for empty."""
    if s is None:
        return None
    s = " ".join(s.replace(SEP, " ").split())
    return s or None


def _item_field(s: str | None) -> str | None:
    """A lab value/unit safe for the diaggym-v1 line (no '; Key: ' sequences, no leading key)."""
    s = _one_line(s)
    if s is None:
        return None
    for k in LAB_KEYS:
        s = s.replace(f"; {k}: ", f", {k} ")
        if s.startswith(f"{k}: "):
            s = f"{k} {s[len(k) + 2 :]}"
    return s or None


def _item_name(label: str) -> str:
    name = _one_line(label) or "Unnamed analyte"
    name = name.replace(": ", " - ")
    return f"{name} (analyte)" if name in LAB_KEYS else name


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", s.lower()).split())


def _text(s: str | None) -> str | None:
    if s is None:
        return None
    s = s.replace(SEP, " ").replace("\r\n", "\n").strip()
    return s or None


# --------------------------------------------------------------------------- notes
def _section(text: str, title: str) -> str | None:
    """Body of a note section (``Title:`` up to the next ``Other Title:`` at line start)."""
    m = re.search(rf"(?im)^\s*{re.escape(title)}\s*:", text)
    if not m:
        return None
    rest = text[m.end() :]
    nxt = re.search(r"(?m)^[ \t]*[A-Z][A-Za-z ]{2,40}:[ \t]*$", rest)
    body = rest[: nxt.start()] if nxt else rest
    return _text(body)


def parse_discharge_note(text: str) -> dict[str, str | None]:
    """Header (before ``Physical Exam:``), admission physical exam and discharge diagnosis of a note."""
    m = re.search(r"(?i)physical exam(ination)?\s*:", text)
    header = _text(text[: m.start()]) if m else None
    pe = None
    if m:
        rest = text[m.end() :]
        end = re.search(r"(?im)^\s*(pertinent results|brief hospital course|discharge physical exam)\b", rest)
        pe = _text(rest[: end.start()] if end else rest)
    dx = _section(text, "Discharge Diagnosis") or _section(text, "Discharge Diagnoses")
    return {"header": header, "physical_exam": pe, "discharge_diagnosis": dx}


# --------------------------------------------------------------------------- the source
class MimicIVBuilder:
    """Reads one MIMIC-IV-layout folder and builds cases; see the module docstring for the rules."""

    def __init__(
        self, root: str | Path, mapping: str | Path | None = None, window_hours: float = 24.0, progress: bool = False
    ) -> None:
        self.root = Path(root)
        self.window = timedelta(hours=window_hours)
        self.progress = progress
        self.catalog = PanelCatalog.from_mapping(mapping)
        self.log = FilterLog()
        self.inputs: list[Path] = []
        if not self.root.exists():
            raise InputError("input folder does not exist", self.root)
        if not self.root.is_dir():
            raise InputError("input is not a folder (expected a MIMIC-IV layout with hosp/ and ed/)", self.root)
        if not any(self.root.iterdir()):
            raise InputError("input folder is empty (expected hosp/ and ed/ with gzip CSV tables)", self.root)
        for sub in ("hosp", "ed"):
            if not (self.root / sub).is_dir():
                raise InputError(f"missing folder {sub}/ (expected a MIMIC-IV layout with hosp/ and ed/)", self.root)

    # -- table access
    def _path(self, module: str, name: str, required: bool = True) -> Path | None:
        p = find_table(self.root / module, name, required)
        if p is not None:
            self.inputs.append(p)
        return p

    def _read(self, module: str, name: str, spec: TableSpec, keep=None) -> tuple[pl.DataFrame, int]:
        path = self._path(module, name)
        assert path is not None
        return scan_table(path, spec, keep, progress=self.progress)

    # -- main
    def build(self) -> SourceResult:
        adm, n_adm = self._read(
            "hosp", "admissions", TableSpec(ints=("subject_id", "hadm_id"), datetimes=("admittime",))
        )
        if n_adm == 0:
            raise InputError("admissions table has no rows", self.root / "hosp")
        adm = adm.filter(pl.col("admittime").is_not_null()).unique("hadm_id", keep="first")
        windows = adm.select(
            "subject_id",
            pl.col("hadm_id").alias("case_hadm"),
            "admittime",
            (pl.col("admittime") - pl.duration(microseconds=int(self.window.total_seconds() * 1e6))).alias("win_start"),
        )
        subjects = set(adm["subject_id"].to_list())
        hadms = adm["hadm_id"].to_list()
        hadm_set = set(hadms)

        patients, _ = self._read(
            "hosp",
            "patients",
            TableSpec(ints=("subject_id", "anchor_age", "anchor_year"), strings=("gender",)),
            keep=lambda d: d.filter(pl.col("subject_id").is_in(list(subjects))),
        )
        services, _ = self._read(
            "hosp",
            "services",
            TableSpec(ints=("hadm_id",), datetimes=("transfertime",), strings=("curr_service",)),
            keep=lambda d: d.filter(pl.col("hadm_id").is_in(hadms)),
        )
        diagnoses, _ = self._read(
            "hosp",
            "diagnoses_icd",
            TableSpec(ints=("hadm_id", "seq_num", "icd_version"), strings=("icd_code",)),
            keep=lambda d: d.filter(pl.col("hadm_id").is_in(hadms)),
        )
        codes = diagnoses.select("icd_code", "icd_version").unique()
        d_icd, _ = self._read(
            "hosp",
            "d_icd_diagnoses",
            TableSpec(ints=("icd_version",), strings=("icd_code", "long_title")),
            keep=lambda d: d.join(codes, on=["icd_code", "icd_version"], how="semi"),
        )
        d_lab, _ = self._read("hosp", "d_labitems", TableSpec(ints=("itemid",), strings=("label", "fluid")))

        edstays, _ = self._read(
            "ed",
            "edstays",
            TableSpec(ints=("subject_id", "hadm_id", "stay_id"), datetimes=("intime",)),
            keep=lambda d: d.filter(pl.col("hadm_id").is_in(hadms)),
        )
        stays = edstays["stay_id"].to_list()
        vit_cols = tuple(c for c, _, _ in VITALS)
        triage, _ = self._read(
            "ed",
            "triage",
            TableSpec(ints=("stay_id",), strings=(*vit_cols, "chiefcomplaint")),
            keep=lambda d: d.filter(pl.col("stay_id").is_in(stays)),
        )
        vitalsign, _ = self._read(
            "ed",
            "vitalsign",
            TableSpec(ints=("stay_id",), datetimes=("charttime",), strings=(*vit_cols, "rhythm")),
            keep=lambda d: d.filter(pl.col("stay_id").is_in(stays)),
        )

        labs = self._labs(windows)
        micro = self._micro(windows)
        notes = self._notes(hadms)
        radiology = self._radiology(windows)

        return self._assemble(
            adm,
            patients,
            services,
            diagnoses,
            d_icd,
            d_lab,
            edstays,
            triage,
            vitalsign,
            labs,
            micro,
            notes,
            radiology,
            hadm_set,
        )

    # -- time-window matching shared by labs, microbiology and radiology
    def _window_keep(self, key: str, time_col: str, stats: Counter, windows: pl.DataFrame):
        def keep(df: pl.DataFrame) -> pl.DataFrame:
            j = df.join(windows, on="subject_id", how="inner")
            t = pl.col(time_col)
            in_time = j.filter((t >= pl.col("win_start")) & (t <= pl.col("admittime")))
            n_in_time = in_time[key].n_unique()
            ok = in_time.filter(pl.col("hadm_id").is_null() | (pl.col("hadm_id") == pl.col("case_hadm")))
            ok = (
                ok.with_columns((pl.col("hadm_id") == pl.col("case_hadm")).fill_null(False).alias("_named"))
                .sort([key, "_named", "admittime"], descending=[False, True, False])
                .unique(subset=[key], keep="first", maintain_order=True)
                .drop("_named")
            )
            stats["read"] += df.height
            stats["not charted in the 24 h before any admission"] += df.height - n_in_time
            stats["charted to another admission"] += n_in_time - ok[key].n_unique()
            return ok

        return keep

    def _labs(self, windows: pl.DataFrame) -> pl.DataFrame:
        self.lab_stats: Counter = Counter()
        spec = TableSpec(
            ints=("labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid"),
            floats=("valuenum", "ref_range_lower", "ref_range_upper"),
            datetimes=("charttime",),
            strings=("value", "valueuom", "flag", "comments"),
        )
        df, _ = self._read(
            "hosp", "labevents", spec, keep=self._window_keep("labevent_id", "charttime", self.lab_stats, windows)
        )
        return df

    def _micro(self, windows: pl.DataFrame) -> pl.DataFrame:
        self.micro_stats: Counter = Counter()
        spec = TableSpec(
            ints=("microevent_id", "subject_id", "hadm_id", "micro_specimen_id", "isolate_num"),
            datetimes=("chartdate", "charttime"),
            strings=(
                "spec_type_desc",
                "test_name",
                "org_name",
                "quantity",
                "ab_name",
                "dilution_comparison",
                "dilution_value",
                "interpretation",
                "comments",
            ),
        )
        inner = self._window_keep("microevent_id", "_time", self.micro_stats, windows)

        def keep(d: pl.DataFrame) -> pl.DataFrame:
            return inner(d.with_columns(pl.coalesce("charttime", "chartdate").alias("_time")))

        df, _ = self._read("hosp", "microbiologyevents", spec, keep=keep)
        return df

    def _notes(self, hadms: list[int]) -> dict[int, dict]:
        path = self._path("note", "discharge", required=False) if (self.root / "note").is_dir() else None
        if path is None:
            return {}
        df, _ = scan_table(
            path,
            TableSpec(ints=("hadm_id",), strings=("text",)),
            keep=lambda d: d.filter(pl.col("hadm_id").is_in(hadms)),
            progress=self.progress,
        )
        return {h: parse_discharge_note(t or "") for h, t in df.unique("hadm_id", keep="first").iter_rows()}

    def _radiology(self, windows: pl.DataFrame) -> pl.DataFrame | None:
        if not (self.root / "note").is_dir():
            return None
        path = self._path("note", "radiology", required=False)
        if path is None:
            return None
        self.rad_stats: Counter = Counter()
        df, _ = scan_table(
            path,
            TableSpec(ints=("subject_id", "hadm_id"), datetimes=("charttime",), strings=("note_id", "text")),
            keep=self._window_keep("note_id", "charttime", self.rad_stats, windows),
            progress=self.progress,
        )
        detail = self._path("note", "radiology_detail", required=False)
        names: dict[str, str] = {}
        if detail is not None:
            ids = df["note_id"].to_list()
            det, _ = scan_table(
                detail,
                TableSpec(strings=("note_id", "field_name", "field_value")),
                keep=lambda d: d.filter(pl.col("note_id").is_in(ids) & (pl.col("field_name") == "exam_name")),
                progress=self.progress,
            )
            names = dict(det.select("note_id", "field_value").unique("note_id", keep="first").iter_rows())
        return df.with_columns(pl.col("note_id").replace_strict(names, default=None).alias("exam_name"))

    # -- per-case assembly
    def _assemble(
        self,
        adm,
        patients,
        services,
        diagnoses,
        d_icd,
        d_lab,
        edstays,
        triage,
        vitalsign,
        labs,
        micro,
        notes,
        radiology,
        hadm_set,
    ) -> SourceResult:
        log = self.log
        pat = {r["subject_id"]: r for r in patients.iter_rows(named=True)}
        service: dict[int, str] = {}
        for h, s in services.sort("transfertime").select("hadm_id", "curr_service").iter_rows():
            service.setdefault(h, s)
        titles = {(c, v): t for v, c, t in d_icd.select("icd_version", "icd_code", "long_title").iter_rows()}
        dx: dict[int, list[str]] = defaultdict(list)
        for h, _, v, c in (
            diagnoses.sort(["hadm_id", "seq_num"]).select("hadm_id", "seq_num", "icd_version", "icd_code").iter_rows()
        ):
            dx[h].append(_one_line(titles.get((c, v))) or f"ICD-{v} {c}")
        labinfo = {i: (lab, fl) for i, lab, fl in d_lab.select("itemid", "label", "fluid").iter_rows()}

        stay_of: dict[int, int] = {}
        for h, s in edstays.sort("intime").select("hadm_id", "stay_id").iter_rows():
            stay_of[h] = s  # the latest ED stay of the admission
        tri = {r["stay_id"]: r for r in triage.iter_rows(named=True)}
        first_vs: dict[int, dict] = {}
        for r in vitalsign.sort("charttime").iter_rows(named=True):
            if any(r[c] for c, _, _ in VITALS):
                first_vs.setdefault(r["stay_id"], r)

        lab_rows = self._lab_exams(labs, labinfo)
        micro_rows = self._micro_exams(micro)
        rad_rows = self._radiology_exams(radiology)

        case_drop: Counter = Counter()
        exam_stats: Counter = Counter()
        row_used: Counter = Counter()
        row_drop: Counter = Counter()
        cases: list[Case] = []
        rows_adm = adm.sort("hadm_id").iter_rows(named=True)
        for a in tqdm(rows_adm, total=adm.height, desc="cases", disable=not self.progress, leave=False):
            h = a["hadm_id"]
            note = notes.get(h, {})
            exams_by_kind = {
                "lab": lab_rows.get(h, []),
                "microbiology": micro_rows.get(h, []),
                "radiology": rad_rows.get(h, []),
            }
            n_candidate = {k: len(v) for k, v in exams_by_kind.items()}
            nrows = {k: sum(e[3] for e in v) for k, v in exams_by_kind.items()}

            def drop(reason: str, h=h, exams_by_kind=exams_by_kind, nrows=nrows) -> None:
                case_drop[reason] += 1
                exam_stats[f"case excluded: {reason}"] += sum(len(v) for v in exams_by_kind.values())
                for k, n in nrows.items():
                    row_drop[(k, f"case excluded: {reason}")] += n

            diagnosis = note.get("discharge_diagnosis") or "\n".join(dx.get(h, []))
            if not diagnosis:
                drop("no diagnosis")
                continue
            pe = self._physical_exam(tri.get(stay_of.get(h)), first_vs.get(stay_of.get(h)), note)
            if not pe:
                drop("no physical exam")
                continue
            if not any(n_candidate.values()):
                drop("no exam in the 24 h before admission")
                continue
            p = pat.get(a["subject_id"], {})
            age = None
            if p.get("anchor_age") is not None and p.get("anchor_year") is not None:
                age = int(p["anchor_age"]) + (a["admittime"].year - int(p["anchor_year"]))
                age = min(max(age, 0), 130)
            triage_row = tri.get(stay_of.get(h)) or {}
            profile = Profile(
                note=note.get("header"),
                sex=_one_line(p.get("gender")),
                age=age,
                service=_one_line(service.get(h)),
                chief_complaint=_one_line(triage_row.get("chiefcomplaint")),
            )
            history = _norm(
                " ".join(x for x in (profile.note, profile.chief_complaint, profile.history_of_present_illness) if x)
            )
            primary = _norm(diagnosis.split("\n", 1)[0])
            if len(primary) >= 4 and primary in history:
                drop("diagnosis stated in the history")
                continue

            timed = sorted(
                (e for v in exams_by_kind.values() for e in v), key=lambda e: (e[0], KIND_ORDER[e[1].kind], e[1].name)
            )
            seen = {x.name for x in pe}
            exams = list(pe)
            times: dict[datetime, int] = {}
            for t, ex, kind, n_rows in timed:
                if ex.name in seen:
                    exam_stats["repeat of an exam earlier in the case"] += 1
                    row_drop[(kind, "repeat of an exam earlier in the case")] += n_rows
                    continue
                seen.add(ex.name)
                ex.group = times.setdefault(t, len(times) + 1)
                ex.time = t.isoformat(timespec="seconds")
                exams.append(ex)
                row_used[kind] += n_rows
                exam_stats["kept"] += 1
            cases.append(
                Case(
                    case_id=f"{SOURCE}:{h}",
                    source=SOURCE,
                    subject_key=f"{SOURCE}:{a['subject_id']}",
                    profile=profile,
                    final_diagnosis=diagnosis,
                    exams=exams,
                )
            )

        log.add("admissions → cases", "case", len(hadm_set), case_drop)
        self._row_steps(row_used, row_drop)
        n_exams = exam_stats.pop("kept", 0)
        log.add(
            "timed exams (lab panels, cultures, reports) → kept", "exam", n_exams + sum(exam_stats.values()), exam_stats
        )
        return SourceResult(cases=cases, inputs=sorted(set(self.inputs)), log=log, source=SOURCE)

    def _row_steps(self, used: Counter, dropped: Counter) -> None:
        tables = [
            ("lab", "labevents rows", self.lab_stats, self.lab_row_drop),
            ("microbiology", "microbiologyevents rows", self.micro_stats, self.micro_row_drop),
        ]
        if getattr(self, "rad_stats", None) is not None:
            tables.append(("radiology", "radiology note rows", self.rad_stats, Counter()))
        for kind, name, window_stats, build_drop in tables:
            reasons: Counter = Counter()
            for r in ("not charted in the 24 h before any admission", "charted to another admission"):
                reasons[r] = window_stats[r]
            reasons.update(build_drop)
            for (k, r), n in dropped.items():
                if k == kind:
                    reasons[r] += n
            step = self.log.add(name, "row", window_stats["read"], reasons)
            if step.kept != used[kind]:  # the arithmetic is the card's promise: check it, never assume it
                raise AssertionError(f"{name}: {step.kept} rows unaccounted vs {used[kind]} used")

    def _lab_exams(self, labs: pl.DataFrame, labinfo: dict) -> dict[int, list]:
        """Per admission: (time, Exam, kind, n_rows) for each lab panel / single analyte."""
        self.lab_row_drop: Counter = Counter()
        out: dict[int, list] = defaultdict(list)
        labs = labs.sort(["case_hadm", "specimen_id", "charttime", "labevent_id"])
        cols = [
            "case_hadm",
            "specimen_id",
            "charttime",
            "itemid",
            "value",
            "valuenum",
            "valueuom",
            "ref_range_lower",
            "ref_range_upper",
            "flag",
            "comments",
        ]
        specimen: list[tuple] = []

        def flush() -> None:
            if not specimen:
                return
            h, _, t = specimen[0][:3]
            by_item: dict[int, LabItem] = {}
            for r in specimen:
                itemid = r[3]
                if itemid not in labinfo:
                    self.lab_row_drop["itemid not in d_labitems"] += 1
                    continue
                if itemid in by_item:
                    self.lab_row_drop["analyte repeated on the same specimen"] += 1
                    continue
                value, comment = _item_field(r[4]), _one_line(r[10])
                if value is None and r[5] is None and comment is None:
                    self.lab_row_drop["no value, numeric value or comment"] += 1
                    continue
                by_item[itemid] = LabItem(
                    name=_item_name(labinfo[itemid][0]),
                    value=value,
                    valuenum=r[5],
                    unit=_item_field(r[6]),
                    ref_low=r[7],
                    ref_high=r[8],
                    flag=_item_field(r[9]),
                    comment=comment,
                )
            for panel, ids in self.catalog.cover(by_item):
                items = [by_item[i] for i in ids]
                if panel:
                    name = panel
                else:
                    label, fluid = labinfo[ids[0]]
                    name = items[0].name
                    if fluid and fluid.strip().lower() not in BLOOD_FLUIDS:
                        name = f"{name} ({_one_line(fluid)})"
                out[h].append((t, Exam(name=name, kind="lab", group=1, items=items), "lab", len(items)))
            specimen.clear()

        key = None
        for r in labs.select(cols).iter_rows():
            if (r[0], r[1]) != key:
                flush()
                key = (r[0], r[1])
            specimen.append(r)
        flush()
        return out

    def _micro_exams(self, micro: pl.DataFrame) -> dict[int, list]:
        """Per admission: one free-text exam per (specimen, test)."""
        self.micro_row_drop: Counter = Counter()
        out: dict[int, list] = defaultdict(list)
        micro = micro.sort(["case_hadm", "micro_specimen_id", "test_name", "isolate_num", "ab_name"], nulls_last=True)
        for (h, _, test), g in micro.group_by(["case_hadm", "micro_specimen_id", "test_name"], maintain_order=True):
            name = _one_line(test)
            if name is None:
                self.micro_row_drop["no test name"] += g.height
                continue
            out[h].append(
                (
                    g["_time"].min(),
                    Exam(name=name, kind="microbiology", group=1, result=micro_result(g)),
                    "microbiology",
                    g.height,
                )
            )
        return out

    def _radiology_exams(self, rad: pl.DataFrame | None) -> dict[int, list]:
        out: dict[int, list] = defaultdict(list)
        if rad is None:
            return out
        for r in rad.sort(["case_hadm", "charttime"]).iter_rows(named=True):
            text = _text(r["text"])
            if text is None:
                continue
            name = _one_line(r["exam_name"]) or "Radiology Report"
            out[r["case_hadm"]].append(
                (r["charttime"], Exam(name=name, kind="radiology", group=1, result=text), "radiology", 1)
            )
        return out

    @staticmethod
    def _physical_exam(triage_row: dict | None, first_vitals: dict | None, note: dict) -> list[Exam]:
        exams = []
        src = triage_row if triage_row and any(triage_row.get(c) for c, _, _ in VITALS) else first_vitals
        if src:
            lines = []
            for col, label, unit in VITALS:
                v = _one_line(src.get(col))
                if v is not None:
                    lines.append(f"{label}: {v}{' ' + unit if unit else ''}")
            if _one_line(src.get("rhythm")):
                lines.append(f"Rhythm: {_one_line(src['rhythm'])}")
            if lines:
                exams.append(Exam(name="PE: Vital Signs", kind="physical", group=0, result="\n".join(lines)))
        if note.get("physical_exam"):
            exams.append(Exam(name="PE: Physical Examination", kind="physical", group=0, result=note["physical_exam"]))
        return exams


def micro_result(g: pl.DataFrame) -> str:
    """Result text of one microbiology test: specimen, organisms with susceptibilities, comments."""
    lines: list[str] = []
    spec = _one_line(g["spec_type_desc"][0])
    if spec:
        lines.append(f"Specimen: {spec}")
    orgs = g.filter(pl.col("org_name").is_not_null())
    for (org, qty), og in orgs.group_by(["org_name", "quantity"], maintain_order=True):
        lines.append(f"Organism: {_one_line(org)}" + (f" ({_one_line(qty)})" if _one_line(qty) else ""))
        for ab, interp, comp, dil in (
            og.filter(pl.col("ab_name").is_not_null())
            .select("ab_name", "interpretation", "dilution_comparison", "dilution_value")
            .unique(maintain_order=True)
            .iter_rows()
        ):
            mic = "".join(x for x in (_one_line(comp), _one_line(dil)) if x)
            detail = " ".join(x for x in (_one_line(interp), f"(MIC {mic})" if mic else None) if x)
            lines.append(f"  {_one_line(ab)}: {detail}".rstrip(": ") if detail else f"  {_one_line(ab)}")
    if orgs.height == 0:
        lines.append("No organism reported.")
    for c in g["comments"].unique(maintain_order=True).drop_nulls().to_list():
        c = _text(c)
        if c:
            lines.append(f"Comments: {c}")
    return "\n".join(lines)


def build_mimic_iv_cases(
    input_dir: str | Path, mapping: str | Path | None = None, window_hours: float = 24.0, progress: bool = False
) -> SourceResult:
    """Build cases from a MIMIC-IV-layout folder (``hosp/``, ``ed/``, optional ``note/``)."""
    return MimicIVBuilder(input_dir, mapping, window_hours, progress).build()
