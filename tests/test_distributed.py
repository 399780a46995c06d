"""Several processes (what entrypoint.sh starts with several GPUs): the same code path through torchrun, on CPU
with the gloo backend. One run id, one upload, DDP over both processes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import DEMO_DATA, ROOT, job_env


def test_two_processes_train_one_run_and_upload_once(tiny_model, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(tiny_model), JOB_DATA=str(DEMO_DATA / "sft.jsonl"), JOB_OUTPUT=str(tmp_path / "out"),
                  JOB_WORKDIR=str(tmp_path / "w"), JOB_TRAIN__MAX_STEPS="3", JOB_TRAIN__LOGGING_STEPS="1", JOB_TRAIN__SAVE_STEPS="2",
                  JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="1", JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1", JOB_TRAIN__MAX_LENGTH="128",
                  OMP_NUM_THREADS="1")
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "job"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "out").iterdir())
    assert len(runs) == 1  # the generated run id is rank 0's on both processes
    run = json.loads((runs[0] / "run.json").read_text())
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert run["world_size"] == 2 and metrics["world_size"] == 2 and metrics["steps"] == 3
    assert abs(metrics["tokens_per_second_per_device"] * 2 - metrics["tokens_per_second"]) < 0.1
    assert (runs[0] / "_SUCCESS").exists() and (runs[0] / "adapter" / "adapter_model.safetensors").exists()
    lines = r.stderr.splitlines()  # rank 0 alone uploads: one checkpoint upload, one _SUCCESS upload
    assert sum("checkpoint checkpoint-2 uploaded" in l for l in lines) == 1
    assert sum("uploading" in l and "_SUCCESS" in l for l in lines) == 1
