"""The job on the other kind of CI host. bitsandbytes' CPU path depends on the CPU: with AVX512-BF16 it repacks 4-bit
weights for its own kernel on the first eval forward (job/model.py keeps them in the training layout), without it
nothing repacks and its plain kernels run. CI hosts come with and without it, so whichever this one is, the job runs
here once as a host without it (tests/hosts/no_avx512_bf16): SFT then DPO through `python -m job`, like a user."""

import json
import os
import subprocess
import sys

import torch

from conftest import DEMO_DATA, ROOT, job_env, run_job

NO_AVX512_BF16 = ROOT / "tests" / "hosts" / "no_avx512_bf16"
PROBE = ("import json, torch, bitsandbytes as bnb; from bitsandbytes.functional import has_avx512bf16; "
         "print(json.dumps([torch.backends.cpu.get_cpu_capability(), bool(has_avx512bf16()), "
         "bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu]))")


def without_avx512_bf16(env: dict) -> dict:
    return {**env, "ATEN_CPU_CAPABILITY": "avx2",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(NO_AVX512_BF16), env.get("PYTHONPATH")]))}


def probe(env: dict) -> list:
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_simulated_host_has_no_avx512_bf16_whatever_this_one_has():
    # torch's kernels, bitsandbytes' check and the flag each new 4-bit layer takes from it
    assert probe(without_avx512_bf16(job_env())) == ["AVX2", False, False]
    native = probe(job_env())  # this host as it is: the simulation is what made the difference above, where it differs
    assert native[1] == native[2]


def test_sft_then_dpo_on_a_host_without_avx512_bf16_and_the_adapter_changes_the_model(tiny_model, tmp_path):
    common = {"JOB_BASE_MODEL": str(tiny_model), "JOB_OUTPUT": str(tmp_path / "runs"), "JOB_WORKDIR": str(tmp_path / "work"),
              "JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": "2", "JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS": "1",
              "JOB_TRAIN__LEARNING_RATE": "5e-3", "JOB_TRAIN__MAX_LENGTH": "128", "JOB_EVAL_FRACTION": "0.2"}
    r = run_job(without_avx512_bf16(job_env(**common, JOB_STAGE="sft", JOB_DATA=str(DEMO_DATA / "sft.jsonl"),
                                            JOB_RUN_ID="sft-h", JOB_TRAIN__MAX_STEPS="4")))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_job(without_avx512_bf16(job_env(**common, JOB_STAGE="dpo", JOB_DATA=str(DEMO_DATA / "dpo.csv"), JOB_RUN_ID="dpo-h",
                                            JOB_ADAPTER=str(tmp_path / "runs" / "sft-h" / "adapter"), JOB_TRAIN__MAX_STEPS="3")))
    assert r.returncode == 0, r.stderr[-3000:]
    for run, steps in (("sft-h", 4), ("dpo-h", 3)):
        out = tmp_path / "runs" / run
        assert (out / "_SUCCESS").exists()
        m = json.loads((out / "metrics.json").read_text())
        assert m["steps"] == steps and m["tokens"] > 0, m
    # A user's next step: the DPO adapter on the base model changes its output.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, tmp_path / "runs" / "dpo-h" / "adapter")(ids).logits
    assert (after - before).abs().max() > 1e-3
