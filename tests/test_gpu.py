"""On a CUDA GPU: the job through its real entry point (`python -m job`), the base model in 4-bit NF4 on the GPU,
SFT and then DPO on top of the SFT adapter, on a model of llm-jp-3-1.8b's shape with random weights.

    pytest -m gpu tests/test_gpu.py          # skipped where there is no CUDA device

QLORA_GPU_TEST_OUT=DIR keeps each stage's metrics.json and run.json there (the benchmark's report quotes them).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT, job_env, json_lines, run_job

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = "1.8b"


@pytest.fixture(scope="module")
def synth():
    sys.path.insert(0, str(ROOT / "bench"))
    import synth as module  # bench/synth.py: llm-jp-3 shapes, its vocabulary size, instruction-like lengths

    return module


@pytest.fixture(scope="module")
def gpu_model(synth, tmp_path_factory) -> Path:
    cached = os.environ.get("QLORA_GPU_TEST_MODEL")  # reuse a model built earlier on this machine
    dest = Path(cached) if cached else tmp_path_factory.mktemp("gpu") / "llm-jp-3-1.8b-random"
    return synth.build_model(dest, SHAPE, device="cuda")


@pytest.fixture(scope="module")
def gpu_data(synth, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("gpudata")
    return synth.write_sft(d / "sft.jsonl", synth.sft_records(256)), synth.write_dpo(d / "preferences.csv", synth.dpo_records(48))


def _keep(run_dir: Path, name: str) -> None:
    out = os.environ.get("QLORA_GPU_TEST_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        for f in ("metrics.json",):
            shutil.copyfile(run_dir / f, Path(out) / f"gpu-test-{name}-{f}")


def test_base_model_is_nf4_on_the_gpu(gpu_model, tmp_path):
    import bitsandbytes as bnb

    from job.model import load_base_model
    from job.settings import load_settings

    s = load_settings({"JOB_STAGE": "sft", "JOB_BASE_MODEL": str(gpu_model), "JOB_DATA": str(tmp_path), "JOB_OUTPUT": str(tmp_path)})
    model = load_base_model(gpu_model, s)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert q.weight.quant_state.quant_type == "nf4" and q.weight.quant_state.nested  # double quantization
    assert q.weight.device.type == "cuda" and q.compute_dtype == torch.bfloat16
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in linears if m is not model.lm_head)  # every projection
    # 1.8B parameters in ~1 GiB of 4-bit weights plus the bf16 embeddings and LM head (2 x 0.4 GiB)
    assert model.get_memory_footprint() / 2**30 < 2.2
    del model
    torch.cuda.empty_cache()


def test_sft_then_dpo_through_the_cli(gpu_model, gpu_data, tmp_path):
    sft_data, dpo_data = gpu_data
    out = tmp_path / "runs"
    common = {"JOB_BASE_MODEL": str(gpu_model), "JOB_OUTPUT": str(out), "JOB_WORKDIR": str(tmp_path / "work"), "JOB_LOG_FORMAT": "json"}

    p = run_job(job_env(**common, JOB_STAGE="sft", JOB_DATA=str(sft_data), JOB_RUN_ID="gpu-sft", JOB_EVAL_FRACTION="0.05"))
    assert p.returncode == 0, p.stderr[-4000:]
    sft_dir = out / "gpu-sft"
    m = json.loads((sft_dir / "metrics.json").read_text())
    run = json.loads((sft_dir / "run.json").read_text())
    assert (sft_dir / "_SUCCESS").exists()
    assert (sft_dir / "adapter" / "adapter_model.safetensors").exists() and (sft_dir / "adapter" / "adapter_config.json").exists()
    assert run["device"].startswith("cuda") and run["config"]["quant"]["load_in"] == "4bit" and run["versions"]["bitsandbytes"]
    assert m["steps"] > 0 and m["tokens"] > 50_000  # 243 examples of ~450 tokens
    assert m["tokens_per_second"] > 0 and 1 < m["peak_gpu_memory_gib"] < 70  # speed targets live in bench/
    assert m["train_loss"] is not None and m["eval_loss"] is not None
    assert any(e.get("event") == "done" for e in json_lines(p.stderr))
    _keep(sft_dir, "sft")

    p = run_job(job_env(**common, JOB_STAGE="dpo", JOB_DATA=str(dpo_data), JOB_RUN_ID="gpu-dpo", JOB_ADAPTER=str(sft_dir / "adapter"),
                        JOB_TRAIN__LEARNING_RATE="5e-6"))
    assert p.returncode == 0, p.stderr[-4000:]
    dpo_dir = out / "gpu-dpo"
    m = json.loads((dpo_dir / "metrics.json").read_text())
    assert (dpo_dir / "_SUCCESS").exists() and (dpo_dir / "adapter" / "adapter_model.safetensors").exists()
    assert m["steps"] > 0 and m["pairs_per_second"] > 0 and m["tokens_per_second"] > 0 and m["peak_gpu_memory_gib"] > 1
    assert m["reward_accuracy"] is not None and m["reward_margin"] is not None
    # DPO continued the SFT adapter: same LoRA shape, and only the trained adapter was saved (not TRL's "ref" copy)
    cfg = json.loads((dpo_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == json.loads((sft_dir / "adapter" / "adapter_config.json").read_text())["r"]
    from safetensors import safe_open

    with safe_open(dpo_dir / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert f.keys() and not any(".ref." in k for k in f.keys())
    _keep(dpo_dir, "dpo")
