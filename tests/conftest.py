"""Fixtures: a tiny random-weight Llama built locally (no downloads), a real S3-compatible server on loopback
(moto's standalone server), and a helper that runs `python -m job` as a user would."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "job" / "demo_data"
FAKE_SECRET = "hf_SECRETtoken1234567890abcdef"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from job.demo import build_tiny_model, demo_texts

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", demo_texts(DEMO_DATA))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint on 127.0.0.1; yields its URL."""
    port = _free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """A boto3 client on the test server, with a fresh bucket named after the test; env set for in-process code."""
    import boto3

    env = {**AWS_ENV, "AWS_ENDPOINT_URL": s3_server}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    import re
    import uuid

    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.originalname.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    client.create_bucket(Bucket=bucket)
    client.env = env
    client.bucket = bucket
    return client


def upload_dir(client, bucket: str, src: Path, prefix: str) -> None:
    for p in sorted(src.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix.rstrip('/')}/{p.relative_to(src).as_posix()}")


def keys(client, bucket: str, prefix: str = "") -> list[str]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def four_bit_lora_model(tiny_model: Path, device: str = "cpu", dropout: float = 0.0, compute_dtype: str = "bfloat16",
                        fp32_adapter: bool = False):
    """The tiny model in NF4 (the job's quantization settings; `compute_dtype` for the base's products and the model's
    other weights) with a LoRA adapter on every linear layer whose B is not zero (init_lora_weights=False), so that the
    adapter changes the outputs from the first step; `fp32_adapter`: the adapter's weights in fp32, as the job trains
    them under bf16 autocast (job/stages/common.py)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from job.model import keep_4bit_layout, quantization_config
    from job.settings import QuantSettings

    m = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quantization_config(QuantSettings(compute_dtype=compute_dtype)),
                                             dtype=getattr(torch, compute_dtype), device_map={"": device})  # the CPU on any machine by default
    keep_4bit_layout(m)  # as job.model.load_base_model does: no CPU repacking that drops gradients (AVX512-BF16 hosts)
    torch.manual_seed(0)
    model = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                         init_lora_weights=False))
    if fp32_adapter:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model


def at_precision(tiny_model: Path, tmp: Path, stage: str, precision: str, **env: str):
    """Settings, tokenizer and model of the tiny model for a stage at one of two precisions: "fp32" (no quantization,
    fp32 compute: comparisons exact up to summation order) or "nf4-bf16" (the job's defaults); loaded with the attention
    the job chooses for this machine."""
    from job.model import load_base_model, load_tokenizer
    from job.settings import load_settings

    base = {"JOB_STAGE": stage, "JOB_BASE_MODEL": str(tiny_model), "JOB_DATA": str(tmp), "JOB_OUTPUT": str(tmp / "out"),
            "JOB_WORKDIR": str(tmp / "w"), "JOB_TRAIN__SAVE_STEPS": "0", **env}
    if precision == "fp32":
        base.update({"JOB_QUANT__LOAD_IN": "none", "JOB_QUANT__COMPUTE_DTYPE": "float32"})
    s = load_settings(base)
    tok, _ = load_tokenizer(tiny_model, None, "auto")
    return s, tok, load_base_model(tiny_model, s)


def run_sft_in_process(tiny_model: Path, tmp_path: Path, run_id: str, steps: int = 3, **env: str) -> Path:
    """A short SFT run of the tiny model on the demo data through pipeline.run in this process (so that a test can
    patch the job's functions); returns the run's output folder."""
    from job import pipeline
    from job.settings import load_settings

    base = {"JOB_STAGE": "sft", "JOB_BASE_MODEL": str(tiny_model), "JOB_DATA": str(DEMO_DATA / "sft.jsonl"),
            "JOB_OUTPUT": str(tmp_path / "out"), "JOB_WORKDIR": str(tmp_path / "w" / run_id),
            "JOB_TRAIN__MAX_STEPS": str(steps), "JOB_TRAIN__SAVE_STEPS": "0", "JOB_TRAIN__MAX_LENGTH": "128",
            "JOB_EVAL_PROMPTS": "none", "JOB_RUN_ID": run_id, **env}
    pipeline.run(load_settings(base))
    return tmp_path / "out" / run_id


def job_env(**extra: str) -> dict:
    """A clean environment for a `python -m job` subprocess: no JOB_ variables from the outside, quiet and fast."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOB_", "AWS_", "HF_TOKEN"))}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2",
                # A random tiny model never says EOS: each run's before/after answers would run to the default 256 tokens.
                "JOB_EVAL_MAX_NEW_TOKENS": "16"})
    env.update(extra)
    return env


def run_job(env: dict, *args: str, timeout: int = 600, python: tuple[str, ...] = (), **popen) -> subprocess.CompletedProcess:
    """`python -m job ARGS`; `python`: the interpreter's own options first (e.g. ("-X", "importtime"))."""
    return subprocess.run([sys.executable, *python, "-m", "job", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **popen)


def imported_modules(stderr: str) -> set[str]:
    """The modules a process imported, from its `python -X importtime` lines on stderr."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def _tree(proc: subprocess.Popen) -> list:
    """proc and all its descendants (torchrun starts each worker in a session of its own, so a process group does
    not reach them)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _abort_tree(proc: subprocess.Popen) -> None:
    """SIGABRT to proc and every descendant: with PYTHONFAULTHANDLER each Python process prints its threads' stacks
    to stderr as it dies, so a hang is reported with where each process was; then SIGKILL to what is left."""
    import signal

    import psutil

    tree = _tree(proc)
    for p in reversed(tree):  # workers first: their stacks are what matters
        try:
            p.send_signal(signal.SIGABRT)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


class Watchdog:
    """A hard deadline for a process and its descendants, started with PYTHONFAULTHANDLER=1 in their environment:
    past `seconds` every one of them gets SIGABRT (stacks printed), then SIGKILL, so a deadlock fails the test with
    the stacks instead of hanging CI; `fired` says it happened. Leaving the block kills whatever is left."""

    def __init__(self, proc: subprocess.Popen, seconds: float):
        import threading

        self.proc, self.fired = proc, False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        _abort_tree(self.proc)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        for p in _tree(self.proc):
            try:
                p.kill()
            except Exception:  # gone meanwhile
                pass
        self.proc.wait()


def run_processes(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run a multi-process command (torchrun, docker/launch.py) in its own session with a hard deadline: a hang
    fails the test with every process's stacks (Watchdog), and no worker outlives the test."""
    proc = subprocess.Popen(cmd, env={**env, "PYTHONFAULTHANDLER": "1"}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    with Watchdog(proc, timeout) as dog:
        out, err = proc.communicate()
    if dog.fired:
        pytest.fail(f"{cmd[0]} ... did not finish within {timeout} s; every process was aborted, stacks:\n{err[-20000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def json_lines(stderr: str) -> list[dict]:
    out = []
    for line in stderr.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def tokenized(tok, stage: str, records: list[dict], max_length: int = 1024) -> list[dict]:
    """Records as the pipeline hands them to a stage's build_trainer: job/sequences.py's fitted rows."""
    from job import sequences

    return sequences.fit(records, stage, tok, max_length=max_length, policy="cut_prompt", stops={tok.eos_token_id},
                         role="train").rows


def plan_as_on_a_big_gpu(monkeypatch, *, checkpointing: bool = False, copy: bool = False, merge: bool = False) -> None:
    """What job/memplan.py's `auto` decides on a GPU with room (checkpointing off, and as asked the dequantized copy and
    the whole step in one micro-batch), on any machine: the out-of-memory tests then see what a retry gives back. A
    setting other than `auto`, and a choice a retry forced, win as in the real planner."""
    from job import memplan

    def choose(s, model, work, *, checkpointing=None, keep_dequantized=None, micro_batch_rows=None, offload=None, **kw):
        t = s.train
        gc = checkpointing if checkpointing is not None else (
            default_gc if t.gradient_checkpointing == "auto" else t.gradient_checkpointing == "true")
        keep = keep_dequantized if keep_dequantized is not None else (
            default_copy if s.quant.keep_dequantized == "auto" else s.quant.keep_dequantized == "true")
        whole = work.rows * work.accumulation
        rows = micro_batch_rows or (whole if t.merge_micro_batches == "true" or (t.merge_micro_batches == "auto" and merge)
                                    else work.rows)
        return memplan.MemoryPlan(gc, keep, rows, bool(offload), report={"auto": True, "test": "as on a big GPU"})

    default_gc, default_copy = checkpointing, copy
    monkeypatch.setattr(memplan, "choose", choose)
