"""TRL adapter: ``GRPOTrainer(environment_factory=DiagGymToolEnv.factory(...))``.

TRL exposes an environment's public methods as tools (their docstrings become the tool schema) and calls
``reset(**row)`` before each rollout and ``get_reward()`` after it.  Here the tools are :meth:`request_exam` and
:meth:`diagnose`; the reward is the environment's (reference parts, see :mod:`diaggym.env.reward`).  A dataset row
may carry ``case_id`` (and ``seed``) to pick the case; without one a case is drawn.  Tools never raise: a call after
the episode ended, or a failing simulator, answers with a sentence the model can read, and the reason is in
:attr:`DiagGymToolEnv.last_info`.  The module imports nothing from TRL (TRL only needs the class).
"""

from __future__ import annotations

from collections.abc import Callable

from diaggym.cases import load_cases
from diaggym.env.core import DiagEnv, EnvConfig, demo_cases_path
from diaggym.env.protocol import RESULT_PREFIX, format_diagnosis, format_request

TOOL_INSTRUCTION = (
    "Work up this patient: call request_exam with one investigation at a time, read each result, and call "
    "diagnose once the results are enough."
)


class DiagGymToolEnv:
    """One rollout's environment; TRL keeps a pool of these and resets them between rollouts."""

    def __init__(self, env: DiagEnv) -> None:
        self.env = env
        self.last_info: dict = {}
        self.reward = 0.0

    @classmethod
    def factory(cls, config: EnvConfig | None = None, **overrides) -> Callable[[], DiagGymToolEnv]:
        """A zero-argument factory for ``environment_factory``; cases are loaded once and shared."""
        cfg = config or EnvConfig(**overrides)
        cases = load_cases(cfg.cases or demo_cases_path())
        return lambda: cls(DiagEnv(cfg, cases=cases))

    def reset(self, **row) -> str:
        """Start an episode (the row's ``case_id``/``seed`` when given); returns the presentation for the prompt."""
        self.reward = 0.0
        self.last_info = {}
        seed = row.get("seed")
        _, info = self.env.reset(seed=int(seed) if seed is not None else None, case_id=row.get("case_id"))
        self.last_info = info
        assert self.env.case is not None
        return f"\n\n{TOOL_INSTRUCTION}\n\nPatient presentation:\n{self.env.presentation(self.env.case)}"

    def request_exam(self, exam: str) -> str:
        """Order one investigation for the patient and read its result.

        Args:
            exam: The investigation's name, for example "Complete Blood Count (CBC)" or "Chest X-ray".

        Returns:
            The investigation's result, or why there is none.
        """
        if self.env.done:
            return "The episode is over; no more investigations."
        r = self.env.step(format_request(str(exam)))
        self._update(r)
        return r.observation.removeprefix(RESULT_PREFIX)

    def diagnose(self, diagnosis: str) -> str:
        """Give the final diagnosis; this ends the episode.

        Args:
            diagnosis: The most likely diagnosis, for example "Community-acquired pneumonia".

        Returns:
            A confirmation that the diagnosis was recorded.
        """
        if self.env.done:
            return "The episode is over."
        r = self.env.step(format_diagnosis(str(diagnosis)))
        self._update(r)
        return r.observation

    def _update(self, r) -> None:
        self.last_info = r.info
        if r.terminated or r.truncated:
            self.reward = float(r.reward)

    def get_reward(self) -> float:
        """The episode's reward (0 until it ended; an episode still open when TRL asks scores its exams only)."""
        if not self.env.done and self.env.case is not None:
            from diaggym.env.reward import key_exams, score_episode

            cfg = self.env.cfg
            parts = score_episode(self.env.case, None, self.env.requested, self.env.turns,
                                  key_exams(self.env.case, cfg.key_exclude_kinds, cfg.key_exams_per_case),
                                  self.env.diagnosis_judge, self.env.exam_judge, cfg.weights, cfg.primary_only)
            return float(parts.total)
        return self.reward
