"""One case through the whole path, checked against strings written by hand from the reference format.

A discharge note that sets the known traps (a diagnosis section with sub-headers, a history that mentions
"physical exam:" and "Physical Examination:", a headed admission exam followed by a discharge exam) is put
beside the bundled MIMIC-IV demo tables and built into a case by the real source.  Then:

* the training text, every step prompt, the prompt the server hands its engine (here a real
  OpenAI-compatible upstream, as vLLM is on the cluster) for ``:predict`` and for the OpenAI route, and the
  prompts the RL environment makes the server send, are the same strings, each a prefix of the next;
* the context and the physical-exam events equal golden strings typed out below from the reference's
  format (``note.split('Physical Exam:')[0].strip() + "\\n\\nFinal Diagnosis:\\n" + diagnosis +
  "\\nThe following summarizes the results from the patient's medical examination:\\n"``, events
  ``"Exam name:\\n{name}\\nExam results:\\n{result}<SEP>"``, training text ending in ``<|endoftext|>``).
"""

from __future__ import annotations

import shutil

import httpx
import polars as pl
import pytest

from diaggym.serialization import case_prompts, training_text
from diaggym.sources.mimic_iv import build_mimic_iv_cases
from diaggym.testing import diaggym_serve
from tests.conftest import DEMO
from tests.openai_server import CompletionsServer

S = "\n \n"  # MIMIC-IV-Note separates sections with a line holding one space

HEADER = S.join(
    [
        "Name:  ___                  Unit No:   ___",
        "Admission Date:  ___              Discharge Date:   ___",
        "Date of Birth:  ___             Sex:   M",
        "Service: MEDICINE",
        "Allergies: \nPenicillins",
        "Attending: ___.",
        "Chief Complaint:\nFever and productive cough",
        "History of Present Illness:\nMr. ___ is a ___ man with COPD who presents with three days of cough and "
        "fevers.\nIn the ED, physical exam: notable for crackles at the right base.\nPhysical Examination: at his "
        "clinic visit last week was unremarkable.",
        "Past Medical History:\nCOPD\nHypertension",
        "Social History:\n___",
        "Family History:\nMother with diabetes.",
    ]
)
NOTE = S.join(
    [
        HEADER,
        "Physical Exam:\nADMISSION PHYSICAL EXAM:\nVS: 101.2 128/76 104 22 91% RA\nGENERAL: Ill-appearing, mild "
        "respiratory distress\nHEENT: Dry mucous membranes\nLUNGS: Crackles at the right base, no wheezes\n"
        "CV: Tachycardic, regular rhythm, no murmurs\nABD: Soft, non-tender\nNEURO: Alert and oriented x3\n\n"
        "DISCHARGE PHYSICAL EXAM:\nVS: 98.4 122/70 80 18 96% RA\nGENERAL: Comfortable",
        "Pertinent Results:\nWBC 14.2",
        "Brief Hospital Course:\nTreated with ceftriaxone and azithromycin.",
        "Discharge Diagnosis:\nPrimary:\n- Community-acquired pneumonia\nSecondary:\n- COPD\n- Hypertension",
        "Discharge Condition:\nMental Status: Clear and coherent.\n",
    ]
)

# Written by hand from the reference format (not produced by our code).
GOLDEN_CONTEXT = (
    "Name:  ___                  Unit No:   ___\n \n"
    "Admission Date:  ___              Discharge Date:   ___\n \n"
    "Date of Birth:  ___             Sex:   M\n \n"
    "Service: MEDICINE\n \n"
    "Allergies: \nPenicillins\n \n"
    "Attending: ___.\n \n"
    "Chief Complaint:\nFever and productive cough\n \n"
    "History of Present Illness:\nMr. ___ is a ___ man with COPD who presents with three days of cough and fevers.\n"
    "In the ED, physical exam: notable for crackles at the right base.\n"
    "Physical Examination: at his clinic visit last week was unremarkable.\n \n"
    "Past Medical History:\nCOPD\nHypertension\n \n"
    "Social History:\n___\n \n"
    "Family History:\nMother with diabetes."
    "\n\nFinal Diagnosis:\n"
    "Primary:\n- Community-acquired pneumonia\nSecondary:\n- COPD\n- Hypertension"
    "\nThe following summarizes the results from the patient's medical examination:\n"
)
GOLDEN_PE_EVENTS = (
    "Exam name:\nPE: Vital Signs\nExam results:\n101.2 128/76 104 22 91% RA<SEP>"
    "Exam name:\nPE: General\nExam results:\nIll-appearing, mild respiratory distress<SEP>"
    "Exam name:\nPE: HEENT\nExam results:\nDry mucous membranes<SEP>"
    "Exam name:\nPE: Lungs\nExam results:\nCrackles at the right base, no wheezes<SEP>"
    "Exam name:\nPE: Cardiovascular\nExam results:\nTachycardic, regular rhythm, no murmurs<SEP>"
    "Exam name:\nPE: Abdomen\nExam results:\nSoft, non-tender<SEP>"
    "Exam name:\nPE: Neurological\nExam results:\nAlert and oriented x3<SEP>"
)
N_PE = GOLDEN_PE_EVENTS.count("<SEP>")


@pytest.fixture(scope="module")
def noted_case(tmp_path_factory, demo_result):
    """The demo tables plus one discharge note, built by the real MIMIC-IV source."""
    root = tmp_path_factory.mktemp("compat") / "mimic"
    shutil.copytree(DEMO, root)
    # An admission with lab results, so the case has exams after the physical exam.
    target = max(demo_result.cases, key=lambda c: sum(e.kind == "lab" for e in c.exams))
    (root / "note").mkdir()
    pl.DataFrame(
        {
            "note_id": ["n1"], "subject_id": [int(target.subject_key.split(":")[1])],
            "hadm_id": [int(target.case_id.split(":")[1])], "note_type": ["DS"], "note_seq": [1],
            "charttime": ["2100-01-01 00:00:00"], "storetime": [""], "text": [NOTE],
        }
    ).write_csv(root / "note" / "discharge.csv")  # fmt: skip
    cases = list(build_mimic_iv_cases(root).cases)
    assert [c.case_id for c in cases] == [target.case_id]
    return cases[0]


def test_case_context_and_training_text_match_the_golden_strings(noted_case):
    context, target = training_text(noted_case, "<|endoftext|>")
    assert context == GOLDEN_CONTEXT
    assert target.startswith(GOLDEN_PE_EVENTS)
    assert target.endswith("<SEP><|endoftext|>") and target.count("<|endoftext|>") == 1
    assert target.count("<SEP>") == len(noted_case.exams) > N_PE  # labs follow the physical exam


def test_each_step_prompt_is_a_prefix_of_the_next_and_of_the_training_text(noted_case):
    context, target = training_text(noted_case, "<|endoftext|>")
    text = context + target
    prompts = case_prompts(noted_case)
    assert prompts[0] == GOLDEN_CONTEXT + "Exam name:\nPE: Vital Signs\nExam results:\n"
    golden_events = GOLDEN_PE_EVENTS.split("<SEP>")
    for k in range(1, N_PE):  # step k's prompt, typed out: the context, k golden events, the k-th name
        name = golden_events[k].split("\n")[1]
        expected = GOLDEN_CONTEXT + "<SEP>".join(golden_events[:k]) + f"<SEP>Exam name:\n{name}\nExam results:\n"
        assert prompts[k] == expected
    first_lab = noted_case.exams[N_PE].name
    assert prompts[N_PE] == GOLDEN_CONTEXT + GOLDEN_PE_EVENTS + f"Exam name:\n{first_lab}\nExam results:\n"
    for a, b in zip(prompts, prompts[1:], strict=False):
        assert b.startswith(a)
    assert all(text.startswith(p) for p in prompts)


@pytest.mark.integration
def test_server_and_environment_send_the_same_prompts_upstream(noted_case, demo_result, tmp_path):
    """:predict, the OpenAI route and an RL episode all reach the engine with the step prompts above."""
    from diaggym.engines.baselines import MarginalEngine
    from diaggym.env import DiagEnv
    from diaggym.exam_stats import TrainingStats
    from diaggym.serialization import case_events, render_profile

    train = [c for c in demo_result.cases if c.split == "train"]
    upstream = CompletionsServer(MarginalEngine(TrainingStats.from_cases(train))).start()
    proc, url = diaggym_serve(["--engine", "openai", "--engine-url", upstream.base_url], tmp_path / "serve.log")
    try:
        proc.wait_ready(f"{url}/v2/health/ready", timeout=180)
        prompts = case_prompts(noted_case)
        events = case_events(noted_case)

        def sent_upstream(count: int) -> list[str]:
            # the upstream's log also holds the server's readiness probes (one token, another prompt)
            sent = [(r.body or {}).get("prompt", "") for r in upstream.log]
            return [p for p in sent if p.startswith("Name:")][-count:]

        # :predict with the true history (the step mode of evaluation), for the first steps and the first lab
        steps = [0, 1, N_PE]
        body = {
            "instances": [
                {
                    "profile": render_profile(noted_case.profile),
                    "final_diagnosis": noted_case.final_diagnosis,
                    "history": [{"name": n, "result": r} for n, r in events[:k]],
                    "exam": events[k][0],
                    "seed": k,
                }
                for k in steps
            ]
        }
        r = httpx.post(f"{url}/v1/models/diaggym:predict", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert sorted(sent_upstream(len(steps))) == sorted(prompts[k] for k in steps)

        # the OpenAI route passes the reference rollout's raw prompt through unchanged
        r = httpx.post(
            f"{url}/openai/v1/completions",
            json={"model": "diaggym", "prompt": prompts[2], "max_tokens": 64, "stop": ["<SEP>"]},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert sent_upstream(1) == [prompts[2]]

        # an RL episode against the served simulator: its own history, the same format
        env = DiagEnv(cases=[noted_case.model_copy(update={"split": "test"})], simulator_url=url, split="test")
        env.reset(seed=0, case_id=noted_case.case_id)
        asked = ["Complete Blood Count (CBC)", "Lactate"]
        results = []
        for exam in asked:
            turn = (
                "Current diagnosis: pneumonia\nBased on the patient's initial presentation, the following "
                f"investigation(s) should be performed: {exam}.\nReason: to assess severity"
            )
            step = env.step(turn)
            assert step.observation.startswith("Here is the test result: "), step
            results.append(step.observation.removeprefix("Here is the test result: "))
        first, second = sent_upstream(2)
        assert first == GOLDEN_CONTEXT + "Exam name:\nComplete Blood Count (CBC)\nExam results:\n"
        assert second == (
            first + results[0] + "<SEP>" + "Exam name:\nLactate\nExam results:\n"
        )
    finally:
        proc.stop()
        upstream.stop()
