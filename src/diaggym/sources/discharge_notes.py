"""MIMIC-IV-Note discharge summaries: the profile, the final diagnosis and the physical-exam items.

The rules follow what the reference world model was trained on:

* **Profile**: the note up to the first ``Physical Exam:`` (case-sensitive, that exact heading), as the
  reference's ``note.split('Physical Exam:')[0]``; a history that mentions "physical exam:" in lower case
  or a ``Physical Examination:`` heading does not cut it.
* **Final diagnosis**: the whole ``Discharge Diagnosis`` section as the note writes it, sub-headers
  (``Primary:``, ``Secondary:``) included, up to the next top-level heading of the summary
  (:data:`NOTE_HEADINGS`, e.g. ``Discharge Condition:``).
* **Physical exam**: the admission exam (after that ``Physical Exam:``, up to ``Pertinent Results:`` or
  another top-level heading, or a discharge-exam sub-header) split into headed items, each heading
  normalised to one name of :data:`PE_NAMES` (``GEN:``, ``General:`` -> ``PE: General``;
  ``Lungs:``, ``Resp:``, ``Chest:`` -> ``PE: Lungs``).  Headings that name a body part or a single
  measurement rather than a section (``Eyes:``, ``BP:``, ``Motor:``) go to their section and keep their
  heading in the text; a line with an unknown heading continues the item above it; text before the
  first known heading is ``PE: Other``.  One event per name, in order of first appearance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diaggym.text_rules import norm, text_block

PROFILE_CUT = "Physical Exam:"

# Top-level headings of a MIMIC-IV discharge summary: a section runs until the next of these.
NOTE_HEADINGS = (
    "Name",
    "Admission Date",
    "Discharge Date",
    "Date of Birth",
    "Service",
    "Allergies",
    "Attending",
    "Chief Complaint",
    "Major Surgical or Invasive Procedure",
    "History of Present Illness",
    "Past Medical History",
    "Social History",
    "Family History",
    "Physical Exam",
    "Pertinent Results",
    "Brief Hospital Course",
    "Medications on Admission",
    "Discharge Medications",
    "Discharge Disposition",
    "Facility",
    "Discharge Diagnosis",
    "Discharge Diagnoses",
    "Discharge Condition",
    "Discharge Instructions",
    "Followup Instructions",
)


def _headings_re(headings) -> re.Pattern:
    return re.compile(r"(?im)^[ \t]*(?:" + "|".join(re.escape(h) for h in headings) + r")[ \t]*:")


_TOP_HEADING = _headings_re(NOTE_HEADINGS)
# The exam ends at the next top-level heading; a repeated "PHYSICAL EXAM:" inside it is a sub-header.
_EXAM_END = _headings_re(h for h in NOTE_HEADINGS if h != "Physical Exam")
_DIAGNOSIS = re.compile(r"(?im)^[ \t]*Discharge Diagnos[ie]s[ \t]*:")
_DISCHARGE_EXAM = re.compile(
    r"(?im)^[ \t]*(?:discharge\b[^:\n]{0,30}:|[^:\n]{0,30}\b(?:on|at) discharge\b[^:\n]{0,10}:"
    r"|discharge (?:physical )?exam\b)"
)

# Canonical item name -> (section headings, headings of a part of the section).  Keys are norm()ed.
# fmt: off
PE_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Vital Signs": (
        ("vs", "v s", "vitals", "vital signs", "vital", "vitals signs"),
        ("t", "temp", "tmax", "bp", "hr", "p", "pulse", "rr", "o2", "o2 sat", "o2sat", "spo2", "sao2", "sat",
         "weight", "wt", "height", "pain"),
    ),
    "General": (("general", "gen", "ga", "general appearance", "appearance", "constitutional"), ()),
    "HEENT": (
        ("heent", "head and neck", "ent"),
        ("head", "eyes", "eye", "ears", "nose", "throat", "mouth", "oropharynx", "op", "face", "pupils", "sclera"),
    ),
    "Neck": (("neck",), ("jvp", "jvd", "thyroid")),
    "Cardiovascular": (("cv", "cvs", "cardiac", "heart", "cardiovascular", "cor", "cardio"), ("pulses",)),
    "Lungs": (("lungs", "lung", "pulm", "pulmonary", "resp", "respiratory", "chest"), ()),
    "Abdomen": (("abd", "abdomen", "abdominal", "gi"), ()),
    "Genitourinary": (("gu", "genitourinary", "genitalia"), ("pelvic", "rectal")),
    "Extremities": (("ext", "extr", "extremities", "extremity", "msk", "musculoskeletal"), ("back", "spine")),
    "Neurological": (
        ("neuro", "neurologic", "neurological", "neuro exam", "ns"),
        ("mental status", "ms", "cn", "cranial nerves", "motor", "sensory", "sensation", "reflexes", "gait",
         "coordination", "strength"),
    ),
    "Skin": (("skin", "integument", "derm", "dermatologic"), ("wound", "incision")),
    "Psychiatric": (("psych", "psychiatric"), ("mood", "affect")),
}
# fmt: on
OTHER = "Other"
_ALIASES: dict[str, tuple[str, bool]] = {}  # norm(heading) -> (name, keep the heading in the text)
for _name, (_sections, _parts) in PE_NAMES.items():
    _ALIASES.update({a: (_name, False) for a in _sections})
    _ALIASES.update({a: (_name, True) for a in _parts})
_HEADED = re.compile(r"^[ \t]*[-*•]?[ \t]*(?P<head>[A-Za-z][A-Za-z0-9 /&.,()'-]{0,40}?)[ \t]*:[ \t]*(?P<rest>.*)$")
_SUBHEADER = re.compile(r"(?i)^[ \t]*[A-Za-z /]*\b(?:admission|admit|exam|examination)\b[A-Za-z /]*:?[ \t]*$")


@dataclass(frozen=True)
class DischargeNote:
    """What a case takes from one discharge summary (``None`` where the note lacks it)."""

    header: str | None
    physical_exam: tuple[tuple[str, str], ...]  # (item name without "PE: ", text)
    discharge_diagnosis: str | None


def profile_header(text: str) -> str | None:
    """The reference's profile: the note before the first ``Physical Exam:``, stripped."""
    return text_block(text.split(PROFILE_CUT)[0])


def discharge_diagnosis(text: str) -> str | None:
    """The ``Discharge Diagnosis`` section, sub-headers included, up to the next top-level heading."""
    m = _DIAGNOSIS.search(text)
    if not m:
        return None
    rest = text[m.end() :]
    end = _TOP_HEADING.search(rest)
    return text_block(rest[: end.start()] if end else rest)


def physical_exam_text(text: str) -> str | None:
    """The admission physical exam: after the first ``Physical Exam:``, before results or the discharge exam."""
    if PROFILE_CUT not in text:
        return None
    rest = text.split(PROFILE_CUT, 1)[1]
    ends = [m.start() for rx in (_EXAM_END, _DISCHARGE_EXAM) if (m := rx.search(rest))]
    return text_block(rest[: min(ends)] if ends else rest)


def physical_exam_items(exam: str | None) -> list[tuple[str, str]]:
    """(name, text) per normalised item of an exam's text; see the module docstring for the rules."""
    if not exam:
        return []
    parts: dict[str, list[list[str]]] = {}  # name -> parts, each a list of lines
    current: list[str] | None = None
    for line in exam.split("\n"):
        if not line.strip() or (current is None and _SUBHEADER.match(line)):
            continue
        m = _HEADED.match(line)
        alias = _ALIASES.get(norm(m["head"])) if m else None
        if alias is not None:
            name, keep = alias
            first = line.strip() if keep else m["rest"].strip()
            current = [first] if first else []
            parts.setdefault(name, []).append(current)
        elif current is not None:
            current.append(line.strip())
        else:
            current = [line.strip()]
            parts.setdefault(OTHER, []).append(current)
    items = []
    for name, chunks in parts.items():
        body = "\n".join(ln for chunk in chunks for ln in chunk if ln)
        if body:
            items.append((name, body))
    return items


def parse_discharge_note(text: str) -> DischargeNote:
    """Profile header, physical-exam items and discharge diagnosis of one discharge summary."""
    text = text.replace("\r\n", "\n")
    return DischargeNote(
        header=profile_header(text),
        physical_exam=tuple(physical_exam_items(physical_exam_text(text))),
        discharge_diagnosis=discharge_diagnosis(text),
    )
