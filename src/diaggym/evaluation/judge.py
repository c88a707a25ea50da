"""An LLM judge over any OpenAI-compatible chat endpoint, for the paper's judged metrics.

* **Similarity (0–5)**: how close a generated exam result is to the real one for the
  same patient and exam — the same analytes, values in the same clinical direction
  and magnitude (normal/abnormal, high/low), the same findings for free text.  Wording
  and formatting are not judged.
* **Consistency (pass/fail)**: whether a whole simulated chain of exam results could
  come from one patient with the stated diagnosis — no contradictions between exams,
  repeated analytes that do not jump implausibly, findings compatible with the diagnosis.

The judge must answer in a fixed shape (``Score: N`` / ``Verdict: PASS|FAIL`` on the
first line).  Anything else is retried a bounded number of times and then counted as a
judge failure with its reason — never turned into a score.
"""

from __future__ import annotations

import re
from collections import Counter

SIMILARITY_PROMPT = """You compare a simulated medical exam result with the real result of the same exam for the \
same patient.
Judge clinical similarity only: the same analytes or findings, values on the same side of the reference range and of \
similar magnitude, the same abnormal findings. Ignore wording, order and formatting.
Scale: 5 = clinically equivalent; 4 = minor differences; 3 = same overall picture, some values or findings differ; \
2 = partly similar; 1 = mostly different; 0 = unrelated or unusable.

Exam: {exam}

Real result:
{real}

Simulated result:
{generated}

Answer with exactly one first line "Score: N" (N an integer 0-5), then one line "Reason: ..."."""

CONSISTENCY_PROMPT = """You check a sequence of simulated medical exam results for one patient.
Pass it only if all results could come from one real patient with the final diagnosis below: no contradictions \
between exams, repeated analytes change plausibly, and findings are compatible with the diagnosis.

Final diagnosis:
{diagnosis}

Exam results in order:
{chain}

Answer with exactly one first line "Verdict: PASS" or "Verdict: FAIL", then one line "Reason: ..."."""

_SCORE = re.compile(r"^\s*Score:\s*([0-5])\s*$")
_VERDICT = re.compile(r"^\s*Verdict:\s*(PASS|FAIL)\s*$")


class Judge:
    """Chat-completions judge; ``failures`` counts every unanswerable or unparseable call by reason."""

    def __init__(
        self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0, attempts: int = 3
    ) -> None:
        import openai

        self.model = model
        self.attempts = attempts
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=2)
        self.failures: Counter = Counter()
        self.calls = 0

    def _ask(self, prompt: str, pattern: re.Pattern) -> str | None:
        import openai

        for _ in range(self.attempts):
            self.calls += 1
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=200
                )
                text = reply.choices[0].message.content if reply.choices else None
            except (openai.OpenAIError, ValueError) as err:
                self.failures[f"request failed ({type(err).__name__})"] += 1
                continue
            if not isinstance(text, str) or not text.strip():
                self.failures["empty answer"] += 1
                continue
            m = pattern.match(text.strip().splitlines()[0])
            if m:
                return m.group(1)
            self.failures["unparseable answer"] += 1
        self.failures["gave up after retries"] += 1
        return None

    def similarity(self, exam: str, real: str, generated: str) -> int | None:
        """0–5, or ``None`` when the judge could not give a well-formed answer (counted in ``failures``)."""
        got = self._ask(SIMILARITY_PROMPT.format(exam=exam, real=real, generated=generated or "(empty)"), _SCORE)
        return int(got) if got is not None else None

    def consistency(self, diagnosis: str, chain: list[tuple[str, str]]) -> bool | None:
        text = "\n\n".join(f"{i + 1}. {name}:\n{result}" for i, (name, result) in enumerate(chain))
        got = self._ask(CONSISTENCY_PROMPT.format(diagnosis=diagnosis, chain=text), _VERDICT)
        return None if got is None else got == "PASS"
