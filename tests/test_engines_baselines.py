"""Baseline engines (normal readings, marginal sampling, medians) built from the demo's training split."""

from __future__ import annotations

import hashlib
import statistics

import pytest

from diaggym.cases import Case, Exam, LabItem, Profile, load_cases
from diaggym.engines.base import Completion, EngineError, SamplingParams
from diaggym.engines.baselines import NORMAL_TEXT, MarginalEngine, MedianEngine, NormalEngine, request_seed
from diaggym.exam_stats import TrainingStats, exam_kinds
from diaggym.serialization import EXAMS_HEADER, parse_result, render_prompt, render_result

CONTEXT = "Sex: F\nAge: 67\n\nFinal Diagnosis:\nSepsis\n" + EXAMS_HEADER
CBC = "Complete Blood Count (CBC)"


@pytest.fixture(scope="module")
def train(demo_out):
    out, _card = demo_out
    return load_cases(out / "cases.jsonl", split="train")


@pytest.fixture(scope="module")
def catalog(train) -> TrainingStats:
    return TrainingStats.from_cases(train)


def prompt(exam: str, history: list[tuple[str, str]] | None = None) -> str:
    return render_prompt(CONTEXT, history or [], exam)


def lab_exams(catalog: TrainingStats) -> list[str]:
    return [name for name, s in catalog.exams.items() if s.is_lab]


# ------------------------------------------------------------------ catalog
def test_catalog_holds_every_training_exam_with_real_results(catalog, train):
    names = {e.name for c in train for e in c.exams}
    assert set(catalog.exams) == names
    assert catalog.kind("PE: Vital Signs") == "physical"
    assert catalog.kind(CBC) == "lab"
    n_cbc = sum(1 for c in train for e in c.exams if e.name == CBC)
    assert catalog.get(CBC).n == n_cbc == sum(catalog.get(CBC).results.values())
    assert "Hemoglobin" in catalog.get(CBC).typical_analytes
    assert catalog.analyte(CBC, "Hemoglobin").unit == "g/dL"
    low, high = catalog.analyte(CBC, "Hemoglobin").ref_range
    assert low is not None and high is not None and low < high


def test_catalog_median_is_the_median_of_training_values(catalog, train):
    values = [
        it.valuenum
        for c in train
        for e in c.exams
        if e.name == CBC
        for it in e.items
        if it.name == "Hemoglobin" and it.valuenum is not None
    ]
    assert catalog.analyte(CBC, "Hemoglobin").median == statistics.median(values)
    assert catalog.analyte("No Such Exam", "Hemoglobin") is None


def test_exam_kinds_first_case_decides_and_match_the_statistics(catalog, train):
    assert catalog.kinds() == exam_kinds(train)
    assert exam_kinds(train)["PE: Vital Signs"] == "physical" and exam_kinds(train)[CBC] == "lab"
    cases = [_case(i, [LabItem(name="X", value="1", valuenum=1.0)]) for i in range(2)]
    cases[1].exams[0] = Exam(name="Odd Panel", kind="other", group=1, result="Free text")
    assert exam_kinds(cases) == {"Odd Panel": "lab"}
    assert exam_kinds(reversed(cases)) == {"Odd Panel": "other"}


# ------------------------------------------------------------------ outputs parse
@pytest.mark.parametrize("engine_cls", [NormalEngine, MarginalEngine, MedianEngine])
def test_every_known_exam_gives_parseable_diaggym_v1(engine_cls, catalog):
    engine = engine_cls(catalog)
    names = list(catalog.exams)
    outs = engine.generate([prompt(n) for n in names], SamplingParams(seed=5))
    for name, out in zip(names, outs, strict=True):
        assert isinstance(out, Completion)
        assert out.text and out.text == out.text.strip()
        assert out.finish_reason == "stop"
        assert "fallback" not in out.meta
        parsed = parse_result(out.text, name, catalog.kind(name))
        assert parsed.complete, (name, parsed.unparsed_lines)
        if catalog.get(name).is_lab:
            assert [it.name for it in parsed.items] == list(
                catalog.get(name).typical_analytes
            ) or engine_cls is MarginalEngine
    assert engine.fallbacks == 0


def test_token_counts_are_rough_word_counts(catalog):
    p = prompt(CBC)
    out = MedianEngine(catalog).generate([p])[0]
    assert out.prompt_tokens == len(p.split())
    assert out.completion_tokens == len(out.text.split()) > 0


# ------------------------------------------------------------------ normal readings
def test_normal_values_lie_inside_reference_ranges_with_typical_decimals(catalog):
    engine = NormalEngine(catalog, seed=1)
    checked = 0
    for name in lab_exams(catalog):
        for seed in range(10):
            text = engine.generate([prompt(name)], SamplingParams(seed=seed))[0].text
            for item in parse_result(text, name, "lab").items:
                a = catalog.analyte(name, item.name)
                assert item.unit == a.unit
                assert (item.ref_low, item.ref_high) == a.ref_range
                if not a.is_numeric:
                    assert (item.value, item.comment) == a.typical_text
                    continue
                assert float(item.value) == item.valuenum
                if item.ref_low is not None and item.ref_high is not None:
                    assert item.ref_low <= item.valuenum <= item.ref_high, (name, item)
                    decimals = len(item.value.partition(".")[2])
                    assert decimals >= a.typical_decimals  # more only when the range needs them
                    checked += 1
    assert checked > 500


def test_normal_uses_the_median_when_no_range_is_known(catalog):
    engine = NormalEngine(catalog)
    found = False
    for name in lab_exams(catalog):
        for analyte in catalog.get(name).typical_analytes:
            a = catalog.analyte(name, analyte)
            if a.is_numeric and a.ref_range == (None, None):
                text = engine.generate([prompt(name)], SamplingParams(seed=0))[0].text
                item = next(it for it in parse_result(text, name, "lab").items if it.name == analyte)
                assert item.valuenum == pytest.approx(a.median, abs=10**-a.typical_decimals)
                found = True
    assert found, "the demo has numeric analytes without a reference range"


def test_normal_free_text_is_a_fixed_sentence_per_kind(catalog):
    engine = NormalEngine(catalog)
    out = engine.generate([prompt("PE: Vital Signs"), prompt("Blood Culture, Routine")])
    assert [o.text for o in out] == [NORMAL_TEXT["physical"], NORMAL_TEXT["microbiology"]]
    assert NORMAL_TEXT["radiology"] == "No acute abnormality."


def test_normal_unknown_exam_falls_back_and_is_counted(catalog):
    engine = NormalEngine(catalog)
    out = engine.generate([prompt("Serum Unobtainium")])[0]
    assert out.text == "Normal."
    assert out.meta == {"fallback": "unknown_exam"}
    assert engine.fallbacks == 1 and engine.fallback_exams["Serum Unobtainium"] == 1


# ------------------------------------------------------------------ marginal sampling
def test_marginal_returns_a_real_result_of_that_exam(catalog, train):
    real: dict[str, set[str]] = {}
    for c in train:
        for e in c.exams:
            real.setdefault(e.name, set()).add(render_result(e))
    engine = MarginalEngine(catalog, seed=0)
    names = list(catalog.exams)
    for out, name in zip(engine.generate([prompt(n) for n in names]), names, strict=True):
        assert out.text in real[name]
        assert out.meta == {"kind": catalog.kind(name)}


def test_marginal_samples_vary_and_follow_frequencies(catalog):
    engine = MarginalEngine(catalog, seed=0)
    texts = [o.text for o in engine.generate([prompt(CBC)] * 200)]
    assert len(set(texts)) > 20  # the CBC results in the demo are nearly all distinct


def test_marginal_unseen_exam_falls_back_and_counts(catalog):
    engine = MarginalEngine(catalog)
    outs = engine.generate([prompt("Serum Unobtainium"), prompt(CBC), prompt("Serum Unobtainium"), prompt("Zz")])
    assert [o.text for o in outs if o.meta.get("fallback")] == ["Normal."] * 3
    assert outs[0].meta == {"fallback": "unseen_exam"}
    assert engine.fallbacks == 3
    assert engine.fallback_exams == {"Serum Unobtainium": 2, "Zz": 1}


# ------------------------------------------------------------------ seeds
@pytest.mark.parametrize("engine_cls", [NormalEngine, MarginalEngine])
def test_seeded_draws_are_reproducible_and_batch_independent(engine_cls, catalog):
    names = lab_exams(catalog)[:10] + ["PE: Vital Signs"]
    target = prompt(CBC, [("PE: Vital Signs", "Pain Score: 3")])
    alone = engine_cls(catalog, seed=7).generate([target], SamplingParams(seed=42))[0].text

    engine = engine_cls(catalog, seed=7)
    engine.generate([prompt(n) for n in names])  # advance the unseeded stream
    batch = [prompt(n) for n in names] + [target] + [prompt(n) for n in reversed(names)]
    params = [SamplingParams(seed=i) for i in range(len(names))] + [SamplingParams(seed=42)]
    params += [SamplingParams() for _ in names]
    assert engine.generate(batch, params)[len(names)].text == alone

    others = {engine_cls(catalog, seed=7).generate([target], SamplingParams(seed=s))[0].text for s in range(20)}
    assert len(others) > 1, "different seeds should give different draws"
    assert engine_cls(catalog, seed=8).generate([target], SamplingParams(seed=42))[0].text != alone


def test_unseeded_draws_follow_the_engine_stream(catalog):
    a = [o.text for o in MarginalEngine(catalog, seed=1).generate([prompt(CBC)] * 5)]
    b = [o.text for o in MarginalEngine(catalog, seed=1).generate([prompt(CBC)] * 5)]
    c = [o.text for o in MarginalEngine(catalog, seed=2).generate([prompt(CBC)] * 5)]
    assert a == b != c
    assert len(set(a)) > 1


def test_request_seed_is_stable_across_processes():
    # sha256, not hash(): this exact number must not change between runs or Python versions.
    assert request_seed(0, 1, "Anion Gap") == request_seed(0, 1, "Anion Gap")
    assert request_seed(0, 1, "Anion Gap") != request_seed(0, 2, "Anion Gap")
    expected = int.from_bytes(hashlib.sha256(b'[0, 1, "Anion Gap"]').digest()[:8], "big")
    assert request_seed(0, 1, "Anion Gap") == expected


# ------------------------------------------------------------------ medians
def test_median_engine_is_deterministic_and_uses_training_medians(catalog):
    engine = MedianEngine(catalog)
    p = prompt(CBC)
    texts = {o.text for o in engine.generate([p] * 3, [SamplingParams(seed=s) for s in range(3)])}
    assert len(texts) == 1
    items = {it.name: it for it in parse_result(texts.pop(), CBC, "lab").items}
    for name, item in items.items():
        a = catalog.analyte(CBC, name)
        if a.is_numeric:
            assert item.valuenum == pytest.approx(a.median, abs=10**-a.typical_decimals / 2 + 1e-9)
    free = engine.generate([prompt("Blood Culture, Routine")])[0].text
    assert free == catalog.get("Blood Culture, Routine").results.most_common(1)[0][0]


# ------------------------------------------------------------------ bad prompts
@pytest.mark.parametrize("engine_cls", [NormalEngine, MarginalEngine, MedianEngine])
def test_a_prompt_that_does_not_parse_is_an_engine_error(engine_cls, catalog):
    engine = engine_cls(catalog)
    for bad in ["What is the hemoglobin?", CONTEXT + "Exam name:\nCBC\n", CONTEXT + "Exam name:\n\nExam results:\n"]:
        with pytest.raises(EngineError) as info:
            engine.generate([prompt(CBC), bad])
        assert info.value.reason == "bad_prompt"


# ------------------------------------------------------------------ edge cases on hand-made cases
def _case(i: int, items: list[LabItem]) -> Case:
    return Case(
        case_id=f"t:{i}",
        source="test",
        split="train",
        subject_key=f"s{i}",
        profile=Profile(sex="F"),
        final_diagnosis="Test",
        exams=[Exam(name="Odd Panel", kind="lab", group=1, items=items)],
    )


def test_ranges_that_need_more_decimals_and_one_sided_ranges():
    cases = [
        _case(
            i,
            [
                # written with 1 decimal, but the range holds no 1-decimal number
                LabItem(
                    name="Tiny",
                    value=f"{0.1 * (i + 1):.1f}",
                    valuenum=round(0.1 * (i + 1), 1),
                    ref_low=0.01,
                    ref_high=0.08,
                ),
                # one-sided range; the median (50) lies outside it: the bound is used
                LabItem(name="Capped", value=str(40 + 5 * i), valuenum=40.0 + 5 * i, unit="U/L", ref_high=30.5),
                # qualitative
                LabItem(name="Screen", value="NEG", comment="___"),
            ],
        )
        for i in range(5)
    ]
    catalog = TrainingStats.from_cases(cases)
    assert catalog.analyte("Odd Panel", "Capped").median == 50.0
    engine = NormalEngine(catalog)
    for seed in range(20):
        text = engine.generate([prompt("Odd Panel")], SamplingParams(seed=seed))[0].text
        items = {it.name: it for it in parse_result(text, "Odd Panel", "lab").items}
        assert 0.01 <= items["Tiny"].valuenum <= 0.08 and len(items["Tiny"].value) == 4
        assert items["Capped"].value == "30.5" and items["Capped"].ref_high == 30.5
        assert (items["Screen"].value, items["Screen"].comment) == ("NEG", "___")
    median = MedianEngine(catalog).generate([prompt("Odd Panel")])[0].text
    assert "Capped: Value: 50; Numeric Value: 50.0; Units: U/L; Reference Range: <= 30.5" in median
