"""Text rules shared by the sources and the serializer: one definition each.

Each rule has one contract, stated in its docstring.  The sources apply them
when they build cases (so every field fits the ``diaggym-v1`` line), and the
serializer applies the same rules when it reads text back.  The MIMIC-IV
reader has vectorised (polars) forms of :func:`one_line` and
:func:`escape_lab_keys` built from the patterns defined here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from diaggym.cases import LAB_KEYS, SEP

# A lab key inside a field ("...; Units: ...") or at its start ("Units: ...") would make the rendered
# analyte line ambiguous to parse.
LAB_KEY_ALTERNATION = "|".join(re.escape(k) for k in LAB_KEYS)
LAB_KEY_INSIDE = re.compile(rf"; ({LAB_KEY_ALTERNATION}): ")
LAB_KEY_AT_START = re.compile(rf"^({LAB_KEY_ALTERNATION}): ")
LAB_KEY_PREFIXES = tuple(f"{k}: " for k in LAB_KEYS)


def one_line(text: str | None) -> str | None:
    """All whitespace (newlines included) collapsed to single spaces, ``<SEP>`` removed; ``None`` when empty."""
    if text is None:
        return None
    out = " ".join(text.replace(SEP, " ").split())
    return out or None


def text_block(text: str | None) -> str | None:
    """Multi-line text kept as written: ``<SEP>`` removed, CRLF as LF, stripped; ``None`` when empty."""
    if text is None:
        return None
    out = text.replace(SEP, " ").replace("\r\n", "\n").strip()
    return out or None


def norm(text: str) -> str:
    """A matching key: lower case, every run of characters other than letters and digits as one space."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def escape_lab_keys(text: str) -> str:
    """A lab value/unit/flag made unambiguous on the analyte line.

    ``"; Units: "`` inside becomes ``", Units "`` and a leading ``"Units: "`` becomes ``"Units "``;
    text without a lab key is returned unchanged.
    """
    text = LAB_KEY_INSIDE.sub(r", \1 ", text)
    return LAB_KEY_AT_START.sub(r"\1 ", text, count=1)


def item_name(label: str | None, fallback: str = "Unnamed analyte") -> str:
    """An analyte name valid on the analyte line: one line, ``": "`` as ``" - "``, never a bare lab key.

    An empty label takes ``fallback``; a name equal to a lab key (``"Value"``) gets ``" (analyte)"``.
    """
    name = (one_line(label) or one_line(fallback) or "Unnamed analyte").replace(": ", " - ")
    return f"{name} (analyte)" if name in LAB_KEYS else name


def cut_at_stop(text: str, stops: Sequence[str], eos: str | None = None) -> tuple[str, bool]:
    """(text before the first stop string or ``eos``, stripped; whether one was found)."""
    cut = len(text)
    for s in (*stops, *((eos,) if eos else ())):
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip(), cut < len(text)
