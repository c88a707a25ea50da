"""AgentClinic OSCE records -> DiagGym cases (contract 1).

Why this source exists: AgentClinic (Schmidgall et al., 2024, MIT licence) ships
small, openly licensed diagnostic vignettes in an OSCE layout.  They give DiagGym
a case set that anyone can build, test and evaluate on without credentialed
MIMIC access, and they exercise the same case schema and ``diaggym-v1`` text.

Each JSONL line holds ``{"OSCE_Examination": {...}}`` with ``Patient_Actor``
(demographics and history), ``Physical_Examination_Findings``, ``Test_Results``
and ``Correct_Diagnosis``.  The nested parts are written by hand per vignette:
dicts, lists of strings, lists of dicts, numbers with or without units, empty
sections.  Nothing here lists keys per case; one recursive normaliser turns any
JSON value into a small tree (leaf, analyte, group) and two renderers turn that
tree into exam text or lab analytes:

* every top-level physical-exam section becomes a ``physical`` exam in group 0,
  named ``PE: {Section}``, with nested keys rendered as indented ``Key: value``
  lines;
* every top-level test becomes one exam in group 1 (the OSCE has no times).  A
  test whose name suggests imaging, microbiology or another procedure keeps
  free text; a lab test with at least one numeric-looking result becomes
  analytes (``LabItem``: value, numeric value, unit, reference range when a
  parenthesis states one cleanly, anything else as comment); other lab tests
  keep free text.

The profile is :mod:`diaggym.sources.agentclinic.profile`.  ``Objective_for_Doctor``
is an instruction to the doctor agent, not patient data, and is not used.

A record that cannot become a valid case (no diagnosis, no exam) is dropped and
counted in the :class:`~diaggym.sources.FilterLog`; a line that is not JSON, or
not an OSCE record, raises :class:`~diaggym.errors.InputError` naming the file
and the line.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from diaggym.cases import Case, Exam, ExamKind, iter_json_lines
from diaggym.errors import InputError
from diaggym.sources import FilterLog, SourceResult
from diaggym.sources.agentclinic.profile import build_profile, diagnosis_text
from diaggym.sources.agentclinic.tree import (
    Analyte,
    Node,
    as_analyte,
    get,
    key_label,
    leaves,
    render_text,
    sections,
    tree,
)
from diaggym.sources.agentclinic.values import lab_item, leaf_numeric
from diaggym.text_rules import norm

SOURCE = "agentclinic"
PE_GROUP = 0
TEST_GROUP = 1


# --------------------------------------------------------------------------- exam kinds

_MICRO_RE = re.compile(r"\b(cultures?|gram|stains?|staining|pcr|scrapings?|afb|koh)\b")
_RADIOLOGY_RE = re.compile(
    r"\b(x ?rays?|radiographs?|radiography|ct|cta|mri|mra|ultrasound|ultrasonography|sonography|"
    r"doppler|echocardiogram|echocardiography|echo|mammogram|mammography|imaging|angiogram|angiography|"
    r"pyelogram|barium|scan|pet|fluoroscopy|scintigraphy|dexa|venogram|cholangiogram)\b"
)
_OTHER_RE = re.compile(
    r"\b(ecg|ekg|electrocardiogram|electrocardiography|eeg|electroencephalogram|electroencephalography|"
    r"emg|electromyography|nerve conduction|audiometry|audiology|audiogram|hearing|spirometry|"
    r"pulmonary function|biopsy|biopsies|histopathology|histology|cytology|bone marrow|\w+oscopy|"
    r"polysomnography|sleep|assessment|evaluation|questionnaire|checklists?|psychological|psychiatric|"
    r"cognitive|consult|consultation|manoeuvre|maneuver|vestibular|videonystagmography|autonomic|"
    r"stress test|tilt table|diary)\b"
)


def classify(name: str) -> ExamKind:
    """Exam kind from a test's name: microbiology, radiology, other procedures, else lab."""
    text = norm(name)
    if _MICRO_RE.search(text):
        return "microbiology"
    if _RADIOLOGY_RE.search(text):
        return "radiology"
    if _OTHER_RE.search(text):
        return "other"
    return "lab"


# --------------------------------------------------------------------------- exams


@dataclass
class _ExamStats:
    sections: int = 0
    dropped: Counter = field(default_factory=Counter)


def _unique(name: str, used: set[str]) -> str:
    if name not in used:
        return name
    n = 2
    while f"{name} ({n})" in used:
        n += 1
    return f"{name} ({n})"


def _test_exam(name: str, node: Node) -> Exam:
    kind = classify(name)
    if kind == "lab":
        found = leaves(node)
        numeric = any(leaf_numeric(n.value if isinstance(n, Analyte) else n) for _, n in found)
        if numeric:
            try:
                items = [lab_item(path, n, name) for path, n in found]
                return Exam(name=name, kind=kind, group=TEST_GROUP, items=items)
            except ValidationError:
                pass  # an analyte the schema refuses: keep the whole test as text
    return Exam(name=name, kind=kind, group=TEST_GROUP, result=render_text(node))


# Section names that only wrap several tests ("Imaging": {"Chest CT": {...}, "MRI": {...}}): each child
# that is itself a structured result becomes its own exam, named as a clinician would order it.
_WRAPPER_WORDS = {
    "imaging",
    "tests",
    "test",
    "studies",
    "work",
    "laboratory",
    "labs",
    "lab",
    "additional",
    "other",
    "special",
    "diagnostic",
    "blood",
    "investigations",
    "results",
}


def _split_wrappers(parts: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for name, content in parts:
        words = set(norm(name).split())
        if (
            words
            and words <= _WRAPPER_WORDS
            and isinstance(content, dict)
            and len(content) >= 1
            and all(isinstance(v, dict) and v and as_analyte(None, v) is None for v in content.values())
        ):
            out.extend((key_label(k) or name, v) for k, v in content.items())
        else:
            out.append((name, content))
    return out


def _build_exams(osce: dict, stats: _ExamStats) -> list[Exam]:
    exams: list[Exam] = []
    used: set[str] = set()
    plan = [(PE_GROUP, s) for s in sections(get(osce, "physical examination findings"), "Physical Examination")]
    plan += [(TEST_GROUP, s) for s in _split_wrappers(sections(get(osce, "test results"), "Test Results"))]
    for group, (title, content) in plan:
        stats.sections += 1
        node = tree(title, content)
        if node is None:
            stats.dropped["empty section"] += 1
            continue
        base = f"PE: {title}" if group == PE_GROUP else title
        name = _unique(base, used)
        try:
            if group == PE_GROUP:
                exam = Exam(name=name, kind="physical", group=PE_GROUP, result=render_text(node))
            else:
                exam = _test_exam(name, node)
        except ValidationError:
            stats.dropped["invalid exam"] += 1
            continue
        used.add(name)
        exams.append(exam)
    return exams


# --------------------------------------------------------------------------- public API


def _osce(record: Any) -> dict | None:
    if not isinstance(record, dict):
        return None
    inner = get(record, "osce examination")
    if isinstance(inner, dict):
        return inner
    return record if get(record, "patient actor") is not None else None


def _convert(record: dict, case_id: str, source: str) -> tuple[Case | None, str | None, _ExamStats]:
    stats = _ExamStats()
    osce = _osce(record)
    if osce is None:
        return None, "not an OSCE record", stats
    diagnosis = diagnosis_text(get(osce, "correct diagnosis"))
    if diagnosis is None:
        return None, "no diagnosis", stats
    exams = _build_exams(osce, stats)
    if not exams:
        return None, "no exams", stats
    canonical = json.dumps(osce, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    try:
        case = Case(
            case_id=case_id,
            source=source,
            split=None,
            subject_key=f"{source}:{hashlib.sha1(canonical.encode('utf-8')).hexdigest()}",
            profile=build_profile(get(osce, "patient actor")),
            final_diagnosis=diagnosis,
            exams=exams,
        )
    except ValidationError:
        return None, "invalid case", stats
    return case, None, stats


def build_agentclinic_cases(path: str | Path, *, source: str = SOURCE) -> SourceResult:
    """Convert an AgentClinic OSCE JSONL file (any file of that format) into cases.

    Case ids are ``{source}:{line number}`` (1-based, blank lines skipped but
    counted); pass another ``source`` (e.g. ``"agentclinic-mimiciv"``) for a
    second file so ids stay unique.  Log steps: ``parse`` (records read),
    ``build`` (cases dropped with reasons ``no diagnosis``, ``no exams``,
    ``invalid case``) and ``exams`` (top-level sections of kept cases; reasons
    ``empty section``, ``invalid exam``).

    Raises :class:`InputError` for a missing file, a line that is not JSON, or a
    JSON line that is not an OSCE record.
    """
    path = Path(path)
    records: list[tuple[int, dict]] = []
    for lineno, obj in iter_json_lines(path, "AgentClinic file"):
        if _osce(obj) is None:
            raise InputError(f"{path}:{lineno}: not an AgentClinic OSCE record (no 'OSCE_Examination' object)")
        records.append((lineno, obj))  # type: ignore[arg-type]

    log = FilterLog()
    log.add("parse", "case", len(records), {})
    cases: list[Case] = []
    dropped: Counter = Counter()
    n_sections = 0
    section_drops: Counter = Counter()
    for lineno, obj in records:
        case, reason, stats = _convert(obj, f"{source}:{lineno}", source)
        if case is None:
            dropped[reason] += 1
            continue
        cases.append(case)
        n_sections += stats.sections
        section_drops.update(stats.dropped)
    log.add("build", "case", len(records), dropped)
    log.add("exams", "exam", n_sections, section_drops)
    return SourceResult(cases=cases, inputs=[path], log=log, source=source)
