"""The pipeline teaches: `python -m job` on a tiny 4-bit model learns made-up facts (code -> invented word) by SFT,
then DPO on top of that adapter moves its answers to the style of the chosen answers. Scored from the files the runs
upload (generations.jsonl, metrics.json) with bench/learn/learn.py, the functions the GPU run (bench/learn/run.sh)
uses at llm-jp-3-1.8b's shape.

The controls are in the same files: the starting model's answers ("before") to the same prompts.
"""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, job_env, run_job

sys.path.insert(0, str(ROOT / "bench" / "learn"))
import learn  # noqa: E402

FACTS = 32
#: Two layers of 128. The frozen LM head and final norm bound the logits by |row| x |hidden| = (0.125 x sqrt(128)) x
#: sqrt(128) = 16; at the usual 0.02 init they'd stay within +-2.6, and no answer could become confident.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             initializer_range=0.125)
COMMON = dict(
    JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="32", JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1", JOB_TRAIN__PACKING="false",
    JOB_TRAIN__LOGGING_STEPS="10", JOB_TRAIN__SAVE_STEPS="0", JOB_EVAL_MAX_NEW_TOKENS="8",
    # One thread: a model this small gains nothing from two, and on a busy machine OpenMP's spinning threads cost ~9x
    # the CPU time per step.
    OMP_NUM_THREADS="1",
)
# Tuned on this CPU (full-batch steps, so one step per epoch). SFT: every answer token right from step 20 of 40.
# DPO: from 1e-3 to 4e-3 every held-out pair is ranked right, and 94-100% of the answers are the word, the period, EOS.
SFT = dict(JOB_TRAIN__NUM_TRAIN_EPOCHS="40", JOB_TRAIN__LEARNING_RATE="1e-2")
DPO = dict(JOB_TRAIN__NUM_TRAIN_EPOCHS="10", JOB_TRAIN__LEARNING_RATE="2e-3")


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    work = tmp_path_factory.mktemp("learn")
    return work, learn.prepare(work, FACTS, SHAPE)


@pytest.fixture(scope="module")
def sft_run(facts):
    work, p = facts
    r = run_job(learn.sft_env(job_env(**COMMON), p, work / "runs", JOB_WORKDIR=str(work / "w"), **SFT))
    assert r.returncode == 0, r.stderr[-3000:]
    return work / "runs" / "sft"


def generations(run_dir):
    return [json.loads(line) for line in (run_dir / "generations.jsonl").read_text(encoding="utf-8").splitlines()]


def test_sft_learns_made_up_facts_and_stops_at_eos(sft_run):
    s = learn.score(sft_run)
    print("SFT", s)  # the figures bench/learn/README.md quotes (pytest -s)
    assert s["prompts"] == FACTS
    assert s["exact_and_stopped_after"] >= 0.9, s  # the fact's word, exactly, then EOS
    assert s["exact_match_before"] == 0 and s["stopped_at_eos_before"] == 0, s  # control: the untrained base
    metrics = json.loads((sft_run / "metrics.json").read_text())
    assert metrics["generation_exact_match_after"] == s["exact_match_after"]  # what metrics.json tells a user


def test_dpo_on_the_sft_adapter_learns_the_rule_of_the_chosen_answers(facts, sft_run):
    work, p = facts
    r = run_job(learn.dpo_env(job_env(**COMMON), p, work / "runs", sft_run / "adapter", JOB_WORKDIR=str(work / "w"), **DPO))
    assert r.returncode == 0, r.stderr[-3000:]
    dpo_run = work / "runs" / "dpo"
    s = learn.score(dpo_run)
    print("DPO", s)
    assert s["eval_reward_accuracy"] >= 0.9, s  # on the held-out quarter of the pairs
    assert s["ends_with_rule_suffix_after"] >= 0.9 and s["exact_and_stopped_after"] >= 0.9, s  # the word, the period, EOS
    # Control: the SFT adapter ends about half its answers with the period, as its data did.
    share = sum(f["period"] for f in p["facts"]) / FACTS
    assert s["ends_with_rule_suffix_before"] == pytest.approx(share, abs=1e-3) == s["exact_match_before"], s
    # "before" is the starting model, base + JOB_ADAPTER: the SFT run's trained answers, not the base model's.
    assert [g["before"] for g in generations(dpo_run)] == [g["after"] for g in generations(sft_run)]


#: LoRA variants on a smaller facts set, in this process (no interpreter start per run): each must learn the facts as
#: plain LoRA does. PiSSA and OLoRA are refused by the job (job/lora.py REFUSED_INITS says why), so not here.
VARIANT_FACTS = 12
VARIANTS = {
    # rsLoRA scales by alpha/sqrt(r) = 8 instead of alpha/r = 2: half plain LoRA's learning rate.
    "rslora": dict(JOB_LORA__USE_RSLORA="true", JOB_TRAIN__LEARNING_RATE="5e-3"),
    "dora": dict(JOB_LORA__USE_DORA="true", JOB_TRAIN__LEARNING_RATE="1e-2"),
    # LoRA+: B at 16x, at a rate where plain LoRA learns nothing in as many steps (the control below).
    "loraplus": dict(JOB_TRAIN__LORAPLUS_LR_RATIO="16", JOB_TRAIN__LEARNING_RATE="5e-4"),
    "orthogonal-init": dict(JOB_LORA__INIT_LORA_WEIGHTS="orthogonal", JOB_TRAIN__LEARNING_RATE="1e-2"),
    # Control: plain LoRA at LoRA+'s rate (measured: 0% exact, final loss 3.2, against LoRA+'s 100% and 0.014).
    "control-plain-at-loraplus-rate": dict(JOB_TRAIN__LEARNING_RATE="5e-4"),
}


@pytest.fixture(scope="module")
def small_facts(tmp_path_factory):
    work = tmp_path_factory.mktemp("variants")
    return work, learn.prepare(work, VARIANT_FACTS, SHAPE)


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as COMMON's OMP_NUM_THREADS=1 for the subprocess runs
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_lora_variant_learns_the_facts(small_facts, variant, one_thread, caplog):
    """SFT with the variant, through the settings and pipeline.run as `python -m job` does: >= 90% of the answers
    exactly the fact's word then EOS, from 0% before (the control); the saved adapter says which variant it is."""
    import logging

    from job import pipeline
    from job.settings import load_settings

    work, p = small_facts
    common = {k: v for k, v in COMMON.items() if k != "OMP_NUM_THREADS"}
    env = learn.sft_env({**common, "JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": str(VARIANT_FACTS), "JOB_LOG_FORMAT": "json"},
                        p, work / "runs", variant, JOB_WORKDIR=str(work / "w" / variant), JOB_TRAIN__NUM_TRAIN_EPOCHS="30",
                        **VARIANTS[variant])
    with caplog.at_level(logging.INFO, logger="job"):
        pipeline.run(load_settings(env))
    s = learn.score(work / "runs" / variant)
    print(variant, s)
    assert s["prompts"] == VARIANT_FACTS and s["exact_match_before"] == 0, s
    if variant.startswith("control"):
        assert s["exact_and_stopped_after"] < 0.5, s
        return
    assert s["exact_and_stopped_after"] >= 0.9, s
    config = json.loads((work / "runs" / variant / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is (variant == "rslora") and config["use_dora"] is (variant == "dora")
    assert config["init_lora_weights"] == ("orthogonal" if variant == "orthogonal-init" else True)
    assert any("LoRA+: B matrices at 16 x" in r.getMessage() for r in caplog.records) is (variant == "loraplus")


def test_the_demo_teaches_and_its_summary_shows_it(tmp_path):
    """`qlora-job demo`, the README's first command, as a user runs it: the SFT run answers the made-up facts it was
    taught (the random base answers none), DPO moves the answers to the preferred style, and the closing summary
    shows both with a few before/after pairs and where the files are. Its plan's figures are the run's."""
    import re
    import subprocess
    import time

    from job.demo import DPO_FILE, SFT_FILE

    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "job", "demo", str(tmp_path / "demo")], env=job_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    print(f"demo: {time.monotonic() - t0:.0f}s\n" + r.stdout)  # the figures docs/notes/b1.md quotes (pytest -s)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = tmp_path / "demo" / "runs"
    sft, dpo = (json.loads((runs / name / "metrics.json").read_text()) for name in ("demo-sft", "demo-dpo"))
    assert sft["generation_prompts"] == 32
    assert sft["generation_exact_match_before"] == 0 and sft["generation_exact_match_after"] >= 0.8, sft
    # DPO: every prompt, the chosen (polite) answer as the reference; "before" is the SFT adapter, which answers as
    # its data did (12 of 32 polite).
    polite = lambda run, side: sum(g[side].endswith("です。") for g in generations(runs / run)) / 32  # noqa: E731
    assert dpo["generation_exact_match_before"] == polite("demo-dpo", "before") == 12 / 32, dpo
    assert dpo["generation_exact_match_after"] >= 0.75 and polite("demo-dpo", "after") >= 0.75, dpo
    assert dpo["eval_reward_accuracy"] >= 0.75, dpo
    # The summary: the figures, a few pairs, where the files are.
    out = r.stdout[r.stdout.index("qlora-job demo finished"):]
    assert f"0% before (the random base model) -> {sft['generation_exact_match_after']:.0%} after" in out
    assert f"38% before (base + the SFT adapter) -> {dpo['generation_exact_match_after']:.0%} after" in out
    assert len(re.findall(r"before: .* after: ", out)) == 6 and f"files: {runs / 'demo-dpo'}/" in out
    assert (tmp_path / "demo" / "data" / SFT_FILE).exists() and (tmp_path / "demo" / "data" / DPO_FILE).exists()
    # The plan logged before each run says what the run then did: tokens (DPO: both sequences of every pair) and
    # micro-batches (24 training pairs in a batch of 32: one micro-batch of 24, not 32).
    plans = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{") and '"event": "plan"' in line]
    assert [p["tokens"] for p in plans] == [sft["tokens"], dpo["tokens"]]
    assert [p["micro_batch"] for p in plans] == [sft["micro_batch"], dpo["micro_batch"]] == [{"rows": 32, "per_step": 1},
                                                                                         {"rows": 24, "per_step": 1}]
