"""A small policy that learns in the environment: the proof that DiagGym is an RL environment, not a dataset.

The policy is two linear softmax heads over hand-made features of what the agent has seen (numpy, CPU):

* **next action**: one of the K most common training exams or *stop*; features = the chief complaint's words
  (hashed), which exams were already ordered (those are masked out), the turn;
* **diagnosis** (at *stop*): one of the N most common training primary diagnoses; features = the chief
  complaint's words and the analytes seen out of their reference range (hashed).

Turns go through the environment as protocol text (``format_request`` / ``format_diagnosis``), results come
from the simulator (served or in-process), the reward is the environment's.  Training is GRPO-style: G
episodes per training case, advantage = (reward − group mean) / (group std + ε), REINFORCE on every action's
log-probability, Adam.  Evaluation: held-out cases (val + test), the same episode seeds before and after
training, beside a random policy and the rule-based agent.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from diaggym.cases import Case
from diaggym.env.agents import RandomAgent, RuleAgent, chief_complaint, primary_diagnosis, run_episode
from diaggym.env.core import DiagEnv
from diaggym.env.protocol import RESULT_PREFIX, format_diagnosis, format_request
from diaggym.serialization import parse_result

HASH_DIM = 32
_WORD = re.compile(r"[a-z]+")


@dataclass
class DemoConfig:
    seeds: Sequence[int] = (0, 1, 2)
    iterations: int = 30
    cases_per_iteration: int = 8
    group: int = 8  # episodes per case (GRPO group)
    lr: float = 0.3
    n_exams: int = 24  # action vocabulary: the most common training exams
    n_diagnoses: int = 40
    max_turns: int = 12
    eval_episodes_per_case: int = 4
    workers: int = 4
    extra: dict = field(default_factory=dict)


def _hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big") % HASH_DIM


def _bag(words: list[str]) -> np.ndarray:
    v = np.zeros(HASH_DIM)
    for w in words:
        v[_hash(w)] = 1.0
    return v


def abnormal_analytes(observation: str, exam: str) -> list[str]:
    """Analyte names whose numeric value lies outside its reference range in a result observation."""
    text = observation.removeprefix(RESULT_PREFIX)
    out = []
    for item in parse_result(text, exam, "lab").items:
        v, lo, hi = item.valuenum, item.ref_low, item.ref_high
        if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
            out.append(item.name.casefold())
    return out


class LinearPolicy:
    """Two softmax heads; ``theta`` = (W_action, W_diagnosis)."""

    def __init__(self, exams: list[str], diagnoses: list[str], max_turns: int, seed: int) -> None:
        self.exams, self.diagnoses, self.max_turns = exams, diagnoses, max_turns
        self.da = 1 + HASH_DIM + len(exams) + 1
        self.dd = 1 + 2 * HASH_DIM
        rng = np.random.default_rng(seed)
        self.Wa = rng.normal(0, 0.01, (len(exams) + 1, self.da))
        self.Wd = rng.normal(0, 0.01, (len(diagnoses), self.dd))

    def params(self) -> list[np.ndarray]:
        return [self.Wa, self.Wd]

    def copy(self) -> LinearPolicy:
        p = LinearPolicy.__new__(LinearPolicy)
        p.__dict__.update(self.__dict__)
        p.Wa, p.Wd = self.Wa.copy(), self.Wd.copy()
        return p

    def action_features(self, cc: list[str], ordered: set[int], turn: int) -> np.ndarray:
        mask = np.zeros(len(self.exams))
        mask[list(ordered)] = 1.0
        return np.concatenate([[1.0], _bag(cc), mask, [turn / self.max_turns]])

    def diagnosis_features(self, cc: list[str], abnormal: list[str]) -> np.ndarray:
        return np.concatenate([[1.0], _bag(cc), _bag(abnormal)])


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


@dataclass
class Trajectory:
    reward: float
    parts: dict
    steps: list[tuple[str, np.ndarray, int, np.ndarray]]  # (head, features, choice, probs)


def play(env: DiagEnv, policy: LinearPolicy, case_id: str, seed: int, greedy: bool = False) -> Trajectory:
    """One episode of ``policy``; the agent sees only observations (never the case)."""
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed, case_id=case_id)
    cc = _WORD.findall(chief_complaint(obs))
    ordered: set[int] = set()
    abnormal: list[str] = []
    steps = []
    turn = 0
    while True:
        phi = policy.action_features(cc, ordered, turn)
        logits = policy.Wa @ phi
        if ordered:
            logits[list(ordered)] = -np.inf
        probs = _softmax(logits)
        a = int(np.argmax(probs)) if greedy else int(rng.choice(len(probs), p=probs))
        steps.append(("action", phi, a, probs))
        if a == len(policy.exams):
            psi = policy.diagnosis_features(cc, abnormal)
            dprobs = _softmax(policy.Wd @ psi)
            d = int(np.argmax(dprobs)) if greedy else int(rng.choice(len(dprobs), p=dprobs))
            steps.append(("diagnosis", psi, d, dprobs))
            r = env.step(format_diagnosis(policy.diagnoses[d]))
        else:
            ordered.add(a)
            r = env.step(format_request(policy.exams[a]))
            abnormal += abnormal_analytes(r.observation, policy.exams[a])
        turn += 1
        if r.terminated or r.truncated:
            return Trajectory(r.reward, r.info.get("reward_parts", {}), steps)


class Adam:
    def __init__(self, params: list[np.ndarray], lr: float) -> None:
        self.params, self.lr, self.t = params, lr, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            p += self.lr * (m / (1 - 0.9**self.t)) / (np.sqrt(v / (1 - 0.999**self.t)) + 1e-8)  # ascent


def policy_gradient(policy: LinearPolicy, groups: list[list[Trajectory]]) -> list[np.ndarray]:
    """GRPO-style: group-normalised advantages, REINFORCE over every choice (mean over episodes)."""
    gA, gD = np.zeros_like(policy.Wa), np.zeros_like(policy.Wd)
    n = sum(len(g) for g in groups)
    for group in groups:
        rewards = np.array([t.reward for t in group])
        adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        for t, a in zip(group, adv, strict=True):
            if a == 0:
                continue
            for head, feats, choice, probs in t.steps:
                onehot = np.zeros_like(probs)
                onehot[choice] = 1.0
                grad_logits = (onehot - probs) * a / n  # d log pi / d logits; masked entries have prob 0
                if head == "action":
                    gA += np.outer(grad_logits, feats)
                else:
                    gD += np.outer(grad_logits, feats)
    return [gA, gD]


class EnvPool:
    """One DiagEnv per worker thread (an environment runs one episode at a time)."""

    def __init__(self, make_env: Callable[[], DiagEnv], workers: int) -> None:
        self.envs = [make_env() for _ in range(workers)]
        self.pool = ThreadPoolExecutor(workers)

    def map(self, fn: Callable, items: list) -> list:
        chunks = [items[i:: len(self.envs)] for i in range(len(self.envs))]
        futures = [self.pool.submit(lambda env, ch: [fn(env, x) for x in ch], env, ch)
                   for env, ch in zip(self.envs, chunks, strict=True)]
        parts = [f.result() for f in futures]
        out: list = [None] * len(items)
        for w, part in enumerate(parts):
            for j, r in enumerate(part):
                out[w + j * len(self.envs)] = r
        return out

    def close(self) -> None:
        self.pool.shutdown()
        for e in self.envs:
            e.close()


def vocabularies(train: list[Case], n_exams: int, n_diagnoses: int) -> tuple[list[str], list[str]]:
    exams = Counter(e.name for c in train for e in c.exams if e.kind != "physical")
    dx = Counter(primary_diagnosis(c) for c in train)
    return [n for n, _ in exams.most_common(n_exams)], [d for d, _ in dx.most_common(n_diagnoses)]


def evaluate(pool: EnvPool, policy: LinearPolicy, held_out: list[str], per_case: int, base_seed: int) -> dict:
    jobs = [(cid, base_seed + 1000 * k + i) for i, cid in enumerate(held_out) for k in range(per_case)]
    trajs = pool.map(lambda env, j: play(env, policy, j[0], j[1]), jobs)
    return _summary([t.reward for t in trajs], [t.parts for t in trajs])


def _summary(rewards: list[float], parts: list[dict]) -> dict:
    keys = ("complete", "correct", "exam_f1", "exams_requested")
    return {"mean_reward": float(np.mean(rewards)), "episodes": len(rewards),
            **{f"mean_{k}": float(np.mean([p.get(k, 0.0) for p in parts])) for k in keys}}


def baseline(pool: EnvPool, agent_of: Callable[[], object], held_out: list[str], per_case: int,
             base_seed: int) -> dict:
    jobs = [(cid, base_seed + 1000 * k + i) for i, cid in enumerate(held_out) for k in range(per_case)]
    outs = pool.map(lambda env, j: run_episode(env, agent_of(), seed=j[1], case_id=j[0]), jobs)
    return _summary([o["reward"] for o in outs], [o["reward_parts"] for o in outs])


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a Student-t confidence interval over seeds."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def run_demo(cfg: DemoConfig, cases: list[Case], make_env: Callable[[], DiagEnv],
             log_metric: Callable[[str, float, int], None] | None = None) -> dict:
    """Train one policy per seed; evaluate before/after on held-out cases; baselines; CI over seeds."""
    train = [c for c in cases if c.split == "train"]
    held_out = [c.case_id for c in cases if c.split in ("val", "test")]
    if not train or not held_out:
        raise ValueError("the demo needs train cases and val/test cases")
    exams, diagnoses = vocabularies(train, cfg.n_exams, cfg.n_diagnoses)
    pool = EnvPool(make_env, cfg.workers)
    started = time.perf_counter()
    try:
        per_seed = []
        for seed in cfg.seeds:
            rng = np.random.default_rng(seed)
            policy = LinearPolicy(exams, diagnoses, cfg.max_turns, seed)
            before = evaluate(pool, policy, held_out, cfg.eval_episodes_per_case, 10_000 * (seed + 1))
            opt = Adam(policy.params(), cfg.lr)
            curve = []
            for it in range(cfg.iterations):
                batch = [train[i].case_id for i in rng.choice(len(train), cfg.cases_per_iteration, replace=False)]
                jobs = [(cid, int(rng.integers(2**31))) for cid in batch for _ in range(cfg.group)]
                snapshot = policy.copy()  # rollouts use this iteration's parameters
                trajs = pool.map(lambda env, j, p=snapshot: play(env, p, j[0], j[1]), jobs)
                groups = [trajs[i * cfg.group:(i + 1) * cfg.group] for i in range(len(batch))]
                opt.step(policy_gradient(policy, groups))
                mean_r = float(np.mean([t.reward for t in trajs]))
                curve.append(mean_r)
                if log_metric:
                    log_metric(f"seed{seed}/train_mean_reward", mean_r, it)
            after = evaluate(pool, policy, held_out, cfg.eval_episodes_per_case, 10_000 * (seed + 1))
            per_seed.append({"seed": seed, "before": before, "after": after, "train_curve": curve,
                             "delta": after["mean_reward"] - before["mean_reward"]})
        random_agent = baseline(pool, lambda: RandomAgent(exams, diagnoses, p_stop=1 / (len(exams) + 1),
                                                          seed=7), held_out, cfg.eval_episodes_per_case, 99)
        rule_agent = baseline(pool, lambda: RuleAgent(train), held_out, cfg.eval_episodes_per_case, 99)
    finally:
        pool.close()
    deltas = [s["delta"] for s in per_seed]
    mean, lo, hi = t_interval(deltas)
    return {
        "config": asdict(cfg) | {"seeds": list(cfg.seeds)},
        "train_cases": len(train), "held_out_cases": len(held_out),
        "exam_vocabulary": exams, "diagnosis_vocabulary_size": len(diagnoses),
        "per_seed": per_seed,
        "before_mean": float(np.mean([s["before"]["mean_reward"] for s in per_seed])),
        "after_mean": float(np.mean([s["after"]["mean_reward"] for s in per_seed])),
        "delta": {"mean": mean, "ci95": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0)},
        "random_agent": random_agent, "rule_agent": rule_agent,
        "seconds": round(time.perf_counter() - started, 1),
    }


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for s in result["per_seed"]:
        a.plot(s["train_curve"], label=f"seed {s['seed']}")
    a.set_xlabel("iteration")
    a.set_ylabel("mean episode reward (training cases)")
    a.legend()
    names = ["random", "rule-based", "policy before", "policy after"]
    vals = [result["random_agent"]["mean_reward"], result["rule_agent"]["mean_reward"], result["before_mean"],
            result["after_mean"]]
    b.bar(names, vals, color=["#999", "#777", "#c88", "#4a4"])
    lo, hi = result["delta"]["ci95"]
    b.set_title(f"held-out mean reward; rise {result['delta']['mean']:.3f} (95% CI {lo:.3f}..{hi:.3f})")
    b.set_ylabel("mean episode reward")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
