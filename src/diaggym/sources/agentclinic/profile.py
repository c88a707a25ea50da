"""AgentClinic ``Patient_Actor`` -> the case profile; ``Correct_Diagnosis`` -> the final diagnosis text.

Nothing in ``Patient_Actor`` is dropped: fields without a profile slot (current medications, a
demographics line richer than age and sex, ...) are appended to the history of present illness as
``Key: value`` lines.
"""

from __future__ import annotations

import re
from typing import Any

from diaggym.cases import Profile
from diaggym.sources.agentclinic.tree import inline, key_label, scalar_text
from diaggym.text_rules import norm

_AGE_RES = (
    re.compile(r"\b(\d{1,3})[\s-]*(?:years?|yrs?|y)[\s-]*(?:old|/o)\b", re.IGNORECASE),
    re.compile(r"\b(\d{1,3})\s*-?\s*y\.?\s?o\b\.?", re.IGNORECASE),
    re.compile(r"\bage[d:]?\s*:?\s*(\d{1,3})\b(?!\s*(?:months?|weeks?|days?|hours?|mo|wk))", re.IGNORECASE),
)
_SEX_RE = re.compile(
    r"\b(?P<f>female|woman|women|girl|lady|gravida|nulliparous|primigravida|multiparous|pregnant|postpartum)\b"
    r"|\b(?P<m>male|man|men|boy|gentleman)\b"
    r"|\b(?:sex|gender)\s*[:=]?\s*(?:(?P<f2>f)|(?P<m2>m))\b",
    re.IGNORECASE,
)
_PLAIN_DEMOGRAPHICS = re.compile(r"^\d{1,3}-year-old (?:male|female|man|woman|boy|girl)\.?$", re.IGNORECASE)


def parse_age(text: str) -> int | None:
    """Age in whole years (``"35-year-old female"`` -> 35); ``None`` for months, days, newborns."""
    for rx in _AGE_RES:
        m = rx.search(text)
        if m:
            age = int(m.group(1))
            return age if age <= 130 else None
    return None


def parse_sex(text: str) -> str | None:
    """``"F"``/``"M"`` from the first sex word in the text (``None`` for "child", "student")."""
    m = _SEX_RE.search(text)
    if not m:
        return None
    return "F" if (m["f"] or m["f2"]) else "M"


def _profile_field(key: str) -> str:
    """Which profile slot a ``Patient_Actor`` key fills (``"extra"`` for none)."""
    nk = norm(key)
    if "demograph" in nk:
        return "demographics"
    if "symptom" in nk and "review" not in nk:
        return "symptoms"
    if "allerg" in nk:
        return "allergies"
    if "family" in nk:
        return "family"
    if "social" in nk:
        return "social"
    if "review of systems" in nk or nk == "ros":
        return "ros"
    if "past medical" in nk or nk in ("pmh", "medical history"):
        return "pmh"
    if nk in ("history", "history of present illness", "present illness", "hpi", "present history"):
        return "hpi"
    return "extra"


def build_profile(actor: Any) -> Profile:
    slots: dict[str, list[str]] = {}
    extra: list[str] = []
    hpi_extra: list[str] = []
    cc: str | None = None
    if not isinstance(actor, dict):
        actor = {"History": actor} if actor is not None else {}
    for key, value in actor.items():
        slot = _profile_field(key)
        if slot == "symptoms" and isinstance(value, dict):
            for k, v in value.items():
                nk = norm(k)
                text = inline(v)
                if text is None:
                    continue
                if cc is None and any(w in nk for w in ("primary", "chief", "main", "presenting")):
                    cc = text
                else:
                    hpi_extra.append(f"{key_label(k)}: {text}")
            continue
        text = inline(value)
        if text is None:
            continue
        if slot == "symptoms":
            cc = text if cc is None else f"{cc}; {text}"
        elif slot == "extra":
            extra.append(f"{key_label(key)}: {text}")
        elif slot == "ros":
            hpi_extra.append(f"{key_label(key)}: {text}")
        else:
            slots.setdefault(slot, []).append(text)
    demo = "; ".join(slots.get("demographics", []))
    hpi: list[str] = []
    if demo and not _PLAIN_DEMOGRAPHICS.match(demo):
        hpi.append(f"Demographics: {demo}")
    hpi.extend(slots.get("hpi", []))
    hpi.extend(hpi_extra)
    hpi.extend(extra)

    def joined(slot: str) -> str | None:
        return "\n".join(slots[slot]) if slot in slots else None

    return Profile(
        sex=parse_sex(demo) if demo else None,
        age=parse_age(demo) if demo else None,
        chief_complaint=cc,
        history_of_present_illness="\n".join(hpi) or None,
        past_medical_history=joined("pmh"),
        social_history=joined("social"),
        family_history=joined("family"),
        allergies=joined("allergies"),
    )


def diagnosis_text(value: Any) -> str | None:
    """Correct_Diagnosis as text: a string, or one line per listed diagnosis."""
    if isinstance(value, list):
        lines = [t for t in (inline(v) for v in value) if t]
    elif isinstance(value, dict):
        lines = [f"{key_label(k)}: {t}" for k, v in value.items() if (t := inline(v))]
    else:
        lines = [t] if (t := scalar_text(value)) else []
    return "\n".join(lines) or None
