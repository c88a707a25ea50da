"""An LLM judge over any OpenAI-compatible chat endpoint, for the paper's judged metrics.

The prompts are our own words; what they ask for follows the reference work:

* **Similarity (0–5)** of one predicted exam result against the real result of the same
  exam for the same patient, judged on values, findings and what they mean clinically
  (5 = equivalent, 0 = opposite or unrelated).
* **Consistency (pass/fail)** of one whole predicted chain, judged *leniently*: the judge
  sees the case (profile and final diagnosis, the text the world model was given), the
  predicted chain *and* the real chain, and fails a chain only for clear, significant
  contradictions or factual errors; differing from the real chain is not a failure.

Both are asked at temperature 0 and must answer with one JSON object whose ``score`` is an
integer (0–5, or 0/1), optionally inside a Markdown code fence.  Anything else (prose, a
score out of range, a truncated answer) is retried a bounded number of times and then
counted as a judge failure with its reason — never turned into a score.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

SYSTEM = "You are a physician who grades simulated medical records carefully and answers only in JSON."

SIMILARITY_PROMPT = """Below are two results of the same medical exam for the same patient: the REAL result from \
the record and a PREDICTED result written by a simulator. Rate how similar the prediction is to the real result.

Look at the values and findings themselves and at what they mean clinically (normal or abnormal, high or low, \
the same abnormal findings). Wording, order and formatting do not matter.

0 - entirely different or opposite findings
1 - major differences that change the clinical meaning
2 - significant differences, a different interpretation
3 - moderately similar, pointing in the same clinical direction
4 - very similar, only minor differences
5 - essentially equivalent

Exam: {exam}

REAL result:
{real}

PREDICTED result:
{predicted}

Answer with one JSON object and nothing else:
{{"score": <integer 0-5>, "explanation": "<one or two sentences>"}}"""

CONSISTENCY_PROMPT = """A simulator wrote a whole chain of exam results for one patient. Decide whether the \
PREDICTED chain holds together: no contradictions between its own results, compatible with the patient and the \
final diagnosis below, clinically coherent. The REAL chain of the same exams is given for reference.

Be lenient. A predicted chain that resembles the real one passes. A predicted chain that differs from the real \
one still passes when it has no significant factual errors, fits the case and is coherent. Fail it only for \
clear, significant contradictions or errors that make it clinically unreliable; minor deviations never fail it.

Case:
{case}

PREDICTED chain:
{predicted}

REAL chain:
{real}

Answer with one JSON object and nothing else, score 1 for pass and 0 for fail:
{{"score": <0 or 1>, "explanation": "<one or two sentences>"}}"""

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_score(text: str | None, high: int) -> int | None:
    """The integer ``score`` (0..``high``) of a JSON answer, or ``None`` when the answer is not in that form."""
    if not isinstance(text, str):
        return None
    body = text.strip()
    m = _FENCE.match(body)
    if m:
        body = m.group(1)
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    score = obj.get("score") if isinstance(obj, dict) else None
    if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= high:
        return None
    return score


def chain_text(chain: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"{i + 1}. {name}:\n{result or '(empty)'}" for i, (name, result) in enumerate(chain))


class Judge:
    """Chat-completions judge; ``failures`` counts every unanswerable or unparseable call by reason.

    The API key is ``api_key``, else ``$DIAGGYM_JUDGE_API_KEY``, else ``$OPENAI_API_KEY`` (local servers need none).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        attempts: int = 3,
        max_tokens: int = 1024,
    ) -> None:
        import openai

        key = api_key or os.environ.get("DIAGGYM_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.model = model
        self.attempts = attempts
        self.max_tokens = max_tokens
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=2)
        self.failures: Counter = Counter()
        self.calls = 0

    def _ask(self, prompt: str, high: int) -> int | None:
        import openai

        for _ in range(self.attempts):
            self.calls += 1
            try:
                reply = self.client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                    temperature=0,
                    max_tokens=self.max_tokens,
                )
                choice = reply.choices[0] if reply.choices else None
                text = choice.message.content if choice else None
            except (openai.OpenAIError, ValueError) as err:
                self.failures[f"request failed ({type(err).__name__})"] += 1
                continue
            if not isinstance(text, str) or not text.strip():
                self.failures["empty answer"] += 1
                continue
            score = parse_score(text, high)
            if score is not None:
                return score
            truncated = choice is not None and choice.finish_reason == "length"
            self.failures["answer cut at max_tokens" if truncated else "answer not in the JSON format"] += 1
        self.failures["gave up after retries"] += 1
        return None

    def similarity(self, exam: str, real: str, predicted: str) -> int | None:
        """0–5, or ``None`` when the judge gave no well-formed answer (counted in ``failures``)."""
        return self._ask(SIMILARITY_PROMPT.format(exam=exam, real=real, predicted=predicted or "(empty)"), 5)

    def consistency(
        self, case: str, predicted: list[tuple[str, str]], real: list[tuple[str, str]]
    ) -> bool | None:
        """Pass/fail of a predicted chain given the case text and the real chain; ``None`` when unanswered."""
        got = self._ask(
            CONSISTENCY_PROMPT.format(case=case.strip(), predicted=chain_text(predicted), real=chain_text(real)), 1
        )
        return None if got is None else got == 1
