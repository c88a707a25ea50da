"""The in-process transformers engine: batching, seeded sampling, prefix-KV reuse, stops, limits.

A random base (``init_base`` tiny) mostly repeats one token, which would make "equal outputs"
checks pass for a broken engine, so most tests use a *scrambled* copy: the same tokenizer, with
weights redrawn at a larger scale and an untied output layer, whose greedy text changes every
token and depends on the whole context (positions, masking, cached keys/values).  A third copy,
the *stopper*, has the ``<SEP>`` output row set to a scaled copy of a token it likes to write,
so it emits ``<SEP>`` part-way through a result, as a trained model does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diaggym.cases import SEP, load_cases
from diaggym.engines.base import EngineError, SamplingParams, cut_at_stop
from diaggym.engines.hf import TransformersEngine
from diaggym.engines.prefix_cache import PrefixCache
from diaggym.model.base import init_base
from diaggym.serialization import case_prompts, render_context, render_prompt

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine torch's thread
    pool can make them 50x slower (spinning workers contending with other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cases(demo_out):
    out, _card = demo_out
    return sorted(load_cases(out / "cases.jsonl"), key=lambda c: (-len(c.exams), c.case_id))


@pytest.fixture(scope="module")
def tiny(cases, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "tiny"
    init_base([c for c in cases if c.split == "train"], out, "tiny", seed=0)
    return out


def _save_variant(src: Path, out: Path, edit) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _scramble(model) -> None:
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "embed" in name:
            p.normal_(0, 1.0)
        elif p.ndim == 2:
            p.normal_(0, 2.0 / p.shape[1] ** 0.5)
    model.config.tie_word_embeddings = False
    head = torch.randn_like(model.lm_head.weight) * 2.0 / model.config.hidden_size**0.5
    model.lm_head.weight = torch.nn.Parameter(head)


@pytest.fixture(scope="module")
def scrambled(tiny, tmp_path_factory) -> Path:
    return _save_variant(tiny, tmp_path_factory.mktemp("hf") / "scrambled", _scramble)


def hf_greedy_ids(model_dir: Path, prompt: str, n: int) -> list[int]:
    """Reference: plain ``model.generate`` greedy at batch 1 (no stops)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, enc.input_ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def chain(cases) -> list[str]:
    """The first 6 steps of the demo case with the most exams, true history."""
    return case_prompts(cases[0])[:6]


@pytest.fixture(scope="module")
def mixed_prompts(cases) -> list[str]:
    """Prompts of different cases and very different lengths (exercises padding)."""
    return [case_prompts(cases[0])[5], case_prompts(cases[1])[1], case_prompts(cases[2])[3], case_prompts(cases[3])[0]]


@pytest.fixture(scope="module")
def stopper(scrambled, tmp_path_factory, mixed_prompts) -> tuple[Path, str]:
    """Scrambled model that writes <SEP> where it would have written a token it uses early in a result."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(scrambled)
    sep_id = tok.convert_tokens_to_ids(SEP)
    prompt = mixed_prompts[1]
    gen = hf_greedy_ids(scrambled, prompt, 12)
    x = next(t for j, t in enumerate(gen) if j >= 4 and t not in gen[:j])

    def edit(model) -> None:  # ``model`` is the scrambled one, loaded back
        model.lm_head.weight[sep_id] = 1.3 * model.lm_head.weight[x]

    return _save_variant(scrambled, tmp_path_factory.mktemp("hf") / "stopper", edit), prompt


def engine(path: Path, **kw) -> TransformersEngine:
    return TransformersEngine(path, **kw)


# --------------------------------------------------------------------------- batching
@pytest.mark.parametrize(
    "options",
    [{}, {"ragged_decode": True}, {"ragged_decode": True, "prefill_chunk": 50}],
    ids=["default-padded-decode", "ragged-decode", "ragged-decode-small-chunks"],
)
def test_greedy_batched_equals_one_by_one_and_plain_generate(scrambled, mixed_prompts, options):
    # different max_tokens per row: rows finish at different steps, so the batch is compacted
    # (the longest prompt finishes first, so leading padding columns are dropped too); the padded
    # decode is the default, small chunks split prompts over several packed forwards
    params = [SamplingParams(max_tokens=n, temperature=0.0, stop=()) for n in (6, 24, 20, 16)]  # raw text
    batched = engine(scrambled, prefix_cache_tokens=0, **options).generate(mixed_prompts, params)
    single_engine = engine(scrambled, prefix_cache_tokens=0)
    single = [single_engine.generate([p], [sp])[0] for p, sp in zip(mixed_prompts, params, strict=True)]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.completion_tokens for c in batched] == [6, 24, 20, 16]
    assert all(c.finish_reason == "length" for c in batched)
    assert len({c.text for c in batched}) == 4 and all(len(set(c.text.split())) > 2 for c in batched[1:])
    # and both equal transformers' own greedy decoding of each prompt
    tok = single_engine.tokenizer
    for p, sp, c in zip(mixed_prompts, params, batched, strict=True):
        ref = tok.decode(hf_greedy_ids(scrambled, p, sp.max_tokens), skip_special_tokens=True).strip()
        assert c.text == ref


def test_more_prompts_than_max_batch_size(scrambled, mixed_prompts):
    e = engine(scrambled, prefix_cache_tokens=0, max_batch_size=3)
    out = e.generate(mixed_prompts, GREEDY)
    ref = engine(scrambled, prefix_cache_tokens=0).generate(mixed_prompts, GREEDY)
    assert [c.text for c in out] == [c.text for c in ref]


# --------------------------------------------------------------------------- sampling
def test_seeded_sampling_reproducible_and_batch_independent(scrambled, mixed_prompts):
    """Exact with per-row (ragged) decode attention; the default masked call is the same up to float rounding."""
    e = engine(scrambled, prefix_cache_tokens=0, ragged_decode=True)
    p = mixed_prompts[1]
    sp = [SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=s) for s in range(4)]
    alone = [e.generate([p], [x])[0].text for x in sp]
    again = [e.generate([p], [x])[0].text for x in sp]
    assert alone == again
    assert len(set(alone)) == 4  # different seeds, different samples
    assert alone[0] != e.generate([p], GREEDY)[0].text
    # the same requests inside a mixed batch (other prompts, greedy rows, other seeds, other order)
    others = [SamplingParams(max_tokens=7, temperature=0.7, top_p=0.5, seed=99), GREEDY]
    batch = [mixed_prompts[0], p, mixed_prompts[2], p, p, mixed_prompts[3], p]
    params = [others[0], sp[3], others[1], sp[1], sp[0], others[0], sp[2]]
    out = e.generate(batch, params)
    assert [out[4].text, out[3].text, out[6].text, out[1].text] == alone
    # with the prefix cache on, the repeats of the same prompt reuse the first one's KV
    cached = engine(scrambled, ragged_decode=True).generate(batch, params)
    assert [c.text for c in cached] == [c.text for c in out]
    assert cached[3].cached_prompt_tokens == cached[3].prompt_tokens - 1


def test_tiny_top_p_is_greedy_and_temperature_zero_ignores_seed(scrambled, mixed_prompts):
    e = engine(scrambled, prefix_cache_tokens=0)
    p = mixed_prompts[2]
    greedy = e.generate([p], GREEDY)[0].text
    nucleus = SamplingParams(max_tokens=24, temperature=1.5, top_p=1e-6, seed=5)
    assert e.generate([p], nucleus)[0].text == greedy
    assert e.generate([p], SamplingParams(max_tokens=24, temperature=0.0, seed=123))[0].text == greedy


def test_sampling_draws_from_the_tempered_distribution_with_and_without_a_nucleus(tiny):
    """``_sample`` over fixed logits: empirical frequencies of 6 000 seeded draws against softmax(logits / T),
    for whole-vocabulary rows (no sort) and nucleus rows (sorted, renormalised over the top set)."""
    from diaggym.engines.hf import _Row

    e = engine(tiny, prefix_cache_tokens=0)
    vocab = len(e.tokenizer)
    logits = torch.full((vocab,), -30.0)
    logits[[7, 11, 13, 17]] = torch.tensor([2.0, 1.0, 0.5, -0.5])
    n = 6000
    draws = torch.rand(n, 1, generator=torch.Generator().manual_seed(0))

    def frequencies(temperature: float, top_p: float | None) -> torch.Tensor:
        rows = [_Row(index=i, ids=[1], params=SamplingParams(temperature=temperature, top_p=top_p), seed=i,
                     uniforms=draws[i]) for i in range(n)]
        tokens = e._sample(logits.expand(n, vocab), rows)
        return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / n

    for temperature in (1.0, 0.7):
        want = (logits / temperature).softmax(-1)
        got = frequencies(temperature, None)
        assert (got - want).abs().max() < 0.025  # 4 standard deviations at n = 6 000
        assert got.sum() == pytest.approx(1.0) and set(got.nonzero().flatten().tolist()) <= {7, 11, 13, 17}
    probs = logits.softmax(-1)  # T = 1: token 7 holds 0.57, 7 + 11 hold 0.78
    got = frequencies(1.0, 0.7)
    want = torch.zeros(vocab)
    want[[7, 11]] = probs[[7, 11]] / probs[[7, 11]].sum()
    assert (got - want).abs().max() < 0.025 and got[[13, 17]].sum() == 0


def test_stop_check_skips_only_tokens_that_cannot_end_a_stop(tiny):
    e = engine(tiny, prefix_cache_tokens=0)
    texts = e.tokenizer.batch_decode([[i] for i in range(len(e.tokenizer))], skip_special_tokens=False)
    flagged = [i for i in range(len(texts)) if e._may_complete_stop(i, (SEP,))]
    assert flagged == [i for i, t in enumerate(texts) if SEP[-1] in t]
    assert 0 < len(flagged) < len(texts)
    assert all(e._may_complete_stop(i, (SEP, "\n\n")) for i, t in enumerate(texts) if "\n" in t)
    other = next(i for i in range(len(texts)) if i not in flagged)
    assert not e._may_complete_stop(other, (SEP,)) and e._may_complete_stop(other, ("é",))  # non-ASCII: no filter


# --------------------------------------------------------------------------- prefix reuse
def _own_output_chain(e: TransformersEngine, case, steps: int) -> list:
    context = render_context(case.profile, case.final_diagnosis)
    history: list[tuple[str, str]] = []
    out = []
    for exam in case.exams[:steps]:
        c = e.generate([render_prompt(context, history, exam.name)], GREEDY)[0]
        history.append((exam.name, c.text))
        out.append(c)
    return out


def test_prefix_reuse_on_true_history_chain_matches_uncached(scrambled, cases, chain):
    other = case_prompts(cases[1])[:6]
    cached, fresh = engine(scrambled, prefill_chunk=64), engine(scrambled, prefix_cache_tokens=0)
    got, ref = [], []
    for k in range(6):  # two chains advance together, one batched call per step
        got.append(cached.generate([chain[k], other[k]], GREEDY))
        ref.append(fresh.generate([chain[k], other[k]], GREEDY))
    assert [[c.text for c in step] for step in got] == [[c.text for c in step] for step in ref]
    assert any(c.text for step in got for c in step)
    assert all(c.cached_prompt_tokens == 0 for step in ref for c in step)
    for k in range(1, 6):
        for j in range(2):
            # the whole previous prompt (up to a token or two of re-tokenisation at the boundary) is reused
            assert got[k][j].cached_prompt_tokens >= got[k - 1][j].prompt_tokens - 2, (k, j)
            assert got[k][j].cached_prompt_tokens < got[k][j].prompt_tokens
    stats = cached.stats
    assert stats["completions"] == 12
    assert stats["prompt_tokens"] == sum(c.prompt_tokens for step in got for c in step)
    assert stats["cached_prompt_tokens"] == sum(c.cached_prompt_tokens for step in got for c in step)
    assert stats["cached_prompt_tokens"] > stats["prompt_tokens"] / 2


def test_prefix_reuse_on_own_output_chain_matches_uncached(scrambled, cases):
    cached = _own_output_chain(engine(scrambled), cases[0], 5)
    fresh = _own_output_chain(engine(scrambled, prefix_cache_tokens=0), cases[0], 5)
    assert [c.text for c in cached] == [c.text for c in fresh]
    for k in range(1, 5):
        assert cached[k].cached_prompt_tokens >= cached[k - 1].prompt_tokens - 2


def test_prefix_reuse_covers_generated_tokens(scrambled, chain):
    """The KV of what was generated is kept too: a prompt that continues with that text reuses it."""
    e = engine(scrambled)
    first = e.generate([chain[1]], GREEDY)[0]
    gen = hf_greedy_ids(scrambled, chain[1], GREEDY.max_tokens)
    follow = chain[1] + e.tokenizer.decode(gen) + SEP + "Exam name:\nLactate\nExam results:\n"
    ids = e.tokenizer(follow)["input_ids"]
    held = e.tokenizer(chain[1])["input_ids"] + gen[:-1]  # the last generated token never ran: no KV
    n = next((i for i, (a, b) in enumerate(zip(ids, held, strict=False)) if a != b), min(len(ids), len(held)))
    assert n > first.prompt_tokens + 10  # precondition: the re-tokenised text matches well into the generation
    assert e.generate([follow], GREEDY)[0].cached_prompt_tokens == n


def test_close_frees_the_cache(scrambled, chain):
    e = engine(scrambled)
    e.generate(chain[:1], GREEDY)
    assert e.stats["cache_tokens"] > 0
    e.close()
    assert e.stats["cache_tokens"] == 0
    assert e.generate(chain[1:2], GREEDY)[0].cached_prompt_tokens == 0


def _kv(ids: list[int], tag: float) -> list:
    """Fake one-layer KV whose values identify (tag, position)."""
    pos = torch.arange(len(ids), dtype=torch.float32)
    return [(pos.view(1, 1, -1, 1) + tag, -pos.view(1, 1, -1, 1) - tag)]


def test_prefix_cache_tree_shares_prefixes_and_evicts_lru():
    cache = PrefixCache(budget_tokens=40)
    a = np.arange(20)
    b = np.concatenate([a[:12], 100 + np.arange(8)])  # shares 12 tokens with a
    cache.insert(a, _kv(a.tolist(), 0.0))
    cache.insert(b, _kv(b.tolist(), 1000.0))
    assert cache.tokens == 28  # 20 + the 8 new tokens of b: the prefix is stored once
    path = cache.lookup(np.concatenate([b, [7, 7]]))
    assert sum(n for _, n in path) == 20
    dest = [(torch.full((1, 1, 22, 1), -1.0), torch.full((1, 1, 22, 1), -1.0))]
    PrefixCache.copy_into(path, 20, dest)
    k, v = (x[:, :, :20] for x in dest[0])
    assert bool((dest[0][0][:, :, 20:] == -1.0).all())  # nothing written past the requested length
    expected = torch.cat([torch.arange(12.0), 1000.0 + torch.arange(12.0, 20.0)])
    assert torch.equal(k.flatten(), expected) and torch.equal(v.flatten(), -expected)
    # LRU: touch a, then insert c (disjoint, 15 tokens) over the budget -> b's tail goes, not a
    cache.lookup(a)
    c = 500 + np.arange(15)
    cache.insert(c, _kv(c.tolist(), 5.0))
    assert cache.tokens <= 40 and cache.evictions >= 1
    assert sum(n for _, n in cache.lookup(a)) == 20
    assert sum(n for _, n in cache.lookup(b)) == 12
    assert sum(n for _, n in cache.lookup(c)) == 15
    assert PrefixCache(0).lookup(a) == []


def test_prefix_cache_budget_holds_over_a_long_run(scrambled, cases):
    e = engine(scrambled, prefix_cache_tokens=1500)
    prompts = [case_prompts(c)[2] for c in cases[:6]]
    for p in prompts:
        e.generate([p], SamplingParams(max_tokens=4, temperature=0.0))
        assert e.stats["cache_tokens"] <= 1500
    assert e.stats["evictions"] > 0


# --------------------------------------------------------------------------- stops and limits
def test_stops_at_sep_written_mid_result(stopper):
    path, prompt = stopper
    e = engine(path, prefix_cache_tokens=0)
    c = e.generate([prompt], GREEDY)[0]
    ref_ids = hf_greedy_ids(path, prompt, GREEDY.max_tokens)
    sep_id = e.tokenizer.convert_tokens_to_ids(SEP)
    assert sep_id in ref_ids[1:-1]  # precondition: the reference writes <SEP> part-way
    assert c.finish_reason == "stop"
    assert c.completion_tokens == ref_ids.index(sep_id) + 1
    assert c.text == e.tokenizer.decode(ref_ids[: ref_ids.index(sep_id)]).strip() != ""
    assert SEP not in c.text
    # without the stop string it runs on to max_tokens and the <SEP> is in the raw text
    raw = e.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, stop=()))[0]
    assert raw.finish_reason == "length" and SEP in raw.text and raw.text.startswith(c.text)


def test_custom_stop_string_and_eos(scrambled, mixed_prompts):
    e = engine(scrambled, prefix_cache_tokens=0)
    prompt = mixed_prompts[2]
    gen = hf_greedy_ids(scrambled, prompt, 24)
    j = next(j for j in range(3, 20) if gen[j] not in gen[:j])
    # a stop string: the text of token j
    piece = e.tokenizer.decode([gen[j]]).strip()
    full = e.tokenizer.decode(gen)
    c = e.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, stop=(piece,)))[0]
    assert c.finish_reason == "stop" and c.completion_tokens < 24
    assert c.text == cut_at_stop(full, (piece,))[0]
    # EOS: make token j the end-of-sequence token
    eos = e.tokenizer.convert_ids_to_tokens(gen[j])
    e2 = engine(scrambled, prefix_cache_tokens=0, eos_token=eos)
    c2 = e2.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, stop=()))[0]
    assert c2.finish_reason == "stop"
    assert c2.completion_tokens == j + 1
    assert c2.text == e.tokenizer.decode(gen[:j]).strip()


def test_max_tokens_gives_length(tiny, scrambled, chain):
    for path in (tiny, scrambled):
        c = engine(path).generate([chain[2]], SamplingParams(max_tokens=7, temperature=0.0))[0]
        assert c.finish_reason == "length"
        assert c.completion_tokens == 7


def test_prompt_too_long_is_an_error_not_truncation(tiny):
    e = engine(tiny, prefix_cache_tokens=0)
    limit = e.model.config.max_position_embeddings
    unit = "Hemoglobin: Value: 10.1; Numeric Value: 10.1; Units: g/dL\n"
    n_unit = len(e.tokenizer(unit)["input_ids"])
    text = unit * ((limit - 40) // n_unit)
    n = len(e.tokenizer(text)["input_ids"])
    assert limit - 60 < n <= limit - 8
    with pytest.raises(EngineError) as err:
        e.generate(["short prompt", text], SamplingParams(max_tokens=limit - n + 1, temperature=0.0))
    assert err.value.reason == "prompt_too_long"
    assert str(n) in str(err.value) and str(limit) in str(err.value)
    # exactly at the limit it runs
    c = e.generate([text], SamplingParams(max_tokens=limit - n, temperature=0.0, stop=()))[0]
    assert c.prompt_tokens == n and c.completion_tokens == limit - n


# --------------------------------------------------------------------------- attention plans
def test_attention_plans_match_reference_attention():
    """The engine's attention layouts against plain per-row SDPA, with garbage in the padding."""
    from types import SimpleNamespace

    from diaggym.engines.hf_attention import ATTENTION_PLAN, AttentionPlan, engine_attention

    torch.manual_seed(0)
    heads, kv_heads, d, scale = 8, 2, 16, 0.25
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=heads // kv_heads, is_causal=True)

    def ref(q, k, v, causal_offset=None):  # q [1, H, n, d], k/v [1, KVH, L, d]
        k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
        n, length = q.shape[2], k.shape[2]
        mask = torch.arange(length)[None, :] <= (length - n + torch.arange(n))[:, None]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    # one-token decode over right-aligned rows of different lengths; pads hold large random values
    starts, length = [0, 5, 11], 20
    k = torch.randn(3, kv_heads, length, d) * 5
    v = torch.randn(3, kv_heads, length, d) * 5
    q = torch.randn(3, heads, 1, d)
    expected = torch.cat([ref(q[i : i + 1], k[i : i + 1, :, s:], v[i : i + 1, :, s:]) for i, s in enumerate(starts)])
    token = ATTENTION_PLAN.set(AttentionPlan("ragged", starts=starts))
    try:
        ragged, _ = engine_attention(module, q, k, v, None, scaling=scale)
    finally:
        ATTENTION_PLAN.reset(token)
    mask = (torch.arange(length)[None, :] >= torch.tensor(starts)[:, None])[:, None, None, :]
    padded, _ = engine_attention(module, q, k, v, mask, scaling=scale)
    for got in (ragged, padded):
        assert got.shape == (3, 1, heads, d)
        torch.testing.assert_close(got.transpose(1, 2), expected)

    # packed prefill: row A has 6 cached tokens + 4 new ones, row B 5 new ones and no cache
    bufs = [(torch.randn(1, kv_heads, 12, d), torch.randn(1, kv_heads, 12, d)) for _ in range(2)]
    q = torch.randn(1, heads, 9, d)
    new_k, new_v = torch.randn(1, kv_heads, 9, d), torch.randn(1, kv_heads, 9, d)
    for (bk, bv), (off, n, end) in zip(bufs, [(0, 4, 10), (4, 5, 5)], strict=True):
        bk[:, :, end - n : end], bv[:, :, end - n : end] = new_k[:, :, off : off + n], new_v[:, :, off : off + n]
    groups = heads // kv_heads
    allowed = torch.arange(10)[None, :] <= torch.arange(6, 10)[:, None]
    masks = [allowed.repeat(groups, 1), None]
    plan = AttentionPlan("packed", segments=[(0, 4, 10), (4, 5, 5)], views=[bufs], masks=masks)
    token = ATTENTION_PLAN.set(plan)
    try:
        packed, _ = engine_attention(module, q, new_k, new_v, None, scaling=scale)
    finally:
        ATTENTION_PLAN.reset(token)
    expected = torch.cat(
        [ref(q[:, :, :4], *(x[:, :, :10] for x in bufs[0])), ref(q[:, :, 4:], *(x[:, :, :5] for x in bufs[1]))], dim=2
    )
    torch.testing.assert_close(packed.transpose(1, 2), expected)


def test_ragged_decode_reads_exactly_each_rows_columns(scrambled, mixed_prompts):
    """Every decode step, row b attends from its first real column: the one before is padding (zeros)."""
    from transformers import AttentionInterface

    from diaggym.engines import hf_attention as hf

    e = engine(scrambled, prefix_cache_tokens=0, ragged_decode=True)
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        plan = hf.ATTENTION_PLAN.get()
        if plan is not None and plan.kind == "ragged" and module.layer_idx == 0:
            for i, s in enumerate(plan.starts):
                assert key[i, :, s].abs().sum() > 0
                assert s == 0 or key[i, :, :s].abs().sum() == 0
            seen.append(len(plan.starts))
        return hf.engine_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(hf.ATTN_IMPLEMENTATION, spy)
    try:
        e.generate(mixed_prompts, [SamplingParams(max_tokens=n, temperature=0.0, stop=()) for n in (3, 12, 9, 6)])
    finally:
        AttentionInterface.register(hf.ATTN_IMPLEMENTATION, hf.engine_attention)
    assert seen[0] == 4 and seen[-1] < 4  # the batch was compacted on the way
