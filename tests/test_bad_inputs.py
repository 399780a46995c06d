"""The catalog of bad inputs: each one run as a user would (`python -m job`, env vars), each must exit with its
documented code (job/exitcodes.py) and a message that names the variable, file or row, with no traceback, no secret,
nothing marked successful, and (for everything found before the weights) no weights downloaded.

The cases run three at a time in one module-scoped fixture (each is a fresh Python process that imports torch and
TRL); each case is then its own test, so a failure names the case."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from job.exitcodes import ExitCode

from conftest import DEMO_DATA, FAKE_SECRET, job_env, run_job

AWS_SECRET = "aws-SECRET-key-do-not-print-0123456789"


@dataclass
class Case:
    name: str
    env: dict  # on top of a valid SFT configuration; None as a value removes the variable
    code: ExitCode
    says: list[str]  # substrings the error output must contain ({d}: the case's directory)
    args: tuple = ()
    files: dict = field(default_factory=dict)  # path (relative to the case dir) -> text or bytes


def J(rows) -> str:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"


GOOD_SFT = J([{"text": "質問", "output": "回答"}, {"text": "日本の首都は？", "output": "東京です。"}])
MIXED = J([{"text": "質問", "output": "はい。"}] * 20 + [{"text": "日本の首都はどこですか？" * 3, "output": "東京です。"}] * 10)

CASES = [
    # ---- configuration: exit 2, named variables, before anything is read ----
    Case("nothing set", {"JOB_STAGE": None, "JOB_BASE_MODEL": None, "JOB_DATA": None, "JOB_OUTPUT": None}, ExitCode.CONFIG,
         ["JOB_STAGE: required", "JOB_BASE_MODEL: required", "JOB_DATA: required", "JOB_OUTPUT: required"]),
    Case("unknown stage", {"JOB_STAGE": "ppo"}, ExitCode.CONFIG, ["JOB_STAGE:", "'ppo'"]),
    Case("rank not a number", {"JOB_LORA__R": "sixteen"}, ExitCode.CONFIG, ["JOB_LORA__R:", "'sixteen'"]),
    Case("typo in a LoRA field", {"JOB_LORA__USE_DORRA": "true"}, ExitCode.CONFIG,
         ["JOB_LORA__USE_DORRA: unknown variable", "did you mean JOB_LORA__USE_DORA?"]),
    Case("PiSSA on the 4-bit base", {"JOB_LORA__INIT_LORA_WEIGHTS": "pissa"}, ExitCode.CONFIG,
         ["JOB_LORA__INIT_LORA_WEIGHTS=pissa: not supported"], args=("--check",)),
    Case("negative learning rate", {"JOB_TRAIN__LEARNING_RATE": "-1"}, ExitCode.CONFIG, ["JOB_TRAIN__LEARNING_RATE:"]),
    Case("unknown variable", {"JOB_EPOCHS": "3"}, ExitCode.CONFIG, ["JOB_EPOCHS: unknown variable"]),
    Case("typo in a TRL field", {"JOB_TRAIN__NUM_TRAIN_EPOCH": "3"}, ExitCode.CONFIG,
         ["JOB_TRAIN__NUM_TRAIN_EPOCH: unknown variable", "did you mean JOB_TRAIN__NUM_TRAIN_EPOCHS?"]),
    Case("optimizer typo", {"JOB_TRAIN__OPTIM": "adamw_torch_fusd"}, ExitCode.CONFIG, ["JOB_TRAIN__OPTIM:", "adamw_torch_fusd"]),
    Case("scheduler typo", {"JOB_TRAIN__LR_SCHEDULER_TYPE": "cosin"}, ExitCode.CONFIG, ["JOB_TRAIN__LR_SCHEDULER_TYPE:", "cosin"]),
    Case("DPO loss typo", {"JOB_STAGE": "dpo", "JOB_DATA": "{d}/p.jsonl", "JOB_DPO__LOSS_TYPE": "sigmod"}, ExitCode.CONFIG,
         ["JOB_DPO__LOSS_TYPE: unknown loss type 'sigmod'"]),
    Case("reporting integration not installed", {"JOB_TRAIN__REPORT_TO": "wandb"}, ExitCode.CONFIG,
         ["JOB_TRAIN__REPORT_TO: 'wandb' is not installed"]),
    Case("unknown reporting integration", {"JOB_TRAIN__REPORT_TO": "tensorbord"}, ExitCode.CONFIG,
         ["JOB_TRAIN__REPORT_TO: unknown integration 'tensorbord'"]),
    Case("TRL field with a bad value", {"JOB_TRAIN__NEFTUNE_NOISE_ALPHA": "lots"}, ExitCode.CONFIG,
         ["JOB_TRAIN__NEFTUNE_NOISE_ALPHA: invalid value 'lots'"]),
    Case("a field the job manages", {"JOB_TRAIN__OUTPUT_DIR": "/tmp/x"}, ExitCode.CONFIG, ["JOB_TRAIN__OUTPUT_DIR: set by the job"]),
    Case("unsupported URI scheme", {"JOB_DATA": "ftp://host/data.jsonl"}, ExitCode.CONFIG, ["JOB_DATA:", "unsupported scheme"]),
    Case("invalid bucket name", {"JOB_OUTPUT": "s3://Bad_Bucket/runs"}, ExitCode.CONFIG, ["JOB_OUTPUT:", "bucket name"]),
    Case("bad run id", {"JOB_RUN_ID": "my run!"}, ExitCode.CONFIG, ["JOB_RUN_ID:"]),
    Case("eval data and fraction both", {"JOB_EVAL_DATA": "{d}/d.jsonl", "JOB_EVAL_FRACTION": "0.1"}, ExitCode.CONFIG,
         ["JOB_EVAL_DATA or JOB_EVAL_FRACTION"]),
    Case("quantization typo", {"JOB_QUANT__LOAD_IN": "2bit"}, ExitCode.CONFIG, ["JOB_QUANT__LOAD_IN:"]),
    Case("checkpointing not a boolean", {"JOB_TRAIN__GRADIENT_CHECKPOINTING": "maybe"}, ExitCode.CONFIG,
         ["JOB_TRAIN__GRADIENT_CHECKPOINTING:"]),
    Case("length policy typo", {"JOB_TRAIN__OVER_LENGTH": "truncate"}, ExitCode.CONFIG, ["JOB_TRAIN__OVER_LENGTH:"]),
    Case("output is a regular file", {"JOB_OUTPUT": "{d}/d.jsonl"}, ExitCode.CONFIG, ["JOB_OUTPUT: {d}/d.jsonl: can't write"]),
    Case("output under /proc", {"JOB_OUTPUT": "/proc/qlora-runs"}, ExitCode.CONFIG, ["JOB_OUTPUT: /proc/qlora-runs: can't write"]),
    Case("workdir under a regular file", {"JOB_WORKDIR": "{d}/d.jsonl/work"}, ExitCode.CONFIG, ["JOB_WORKDIR: {d}/d.jsonl/work: can't write"]),
    Case("target module that does not exist", {"JOB_LORA__TARGET_MODULES": "q_proj,v_prj"}, ExitCode.CONFIG,
         ["JOB_LORA__TARGET_MODULES: 'v_prj' not found", "v_proj"]),
    Case("EOS token not in the vocabulary", {"JOB_TRAIN__EOS_TOKEN": "<|eot|>"}, ExitCode.CONFIG,
         ["JOB_TRAIN__EOS_TOKEN='<|eot|>': not a single token"]),
    # URI-looking values that are not URIs: they became local folders (./s3:/my-bucket/runs) and the run succeeded.
    Case("output URI with one slash", {"JOB_OUTPUT": "s3:/my-bucket/runs"}, ExitCode.CONFIG,
         ["JOB_OUTPUT: 's3:/my-bucket/runs': malformed scheme 's3:/'; did you mean s3://my-bucket/runs?"]),
    Case("check with an output URI with one slash", {"JOB_OUTPUT": "s3:/my-bucket/runs"}, ExitCode.CONFIG,
         ["JOB_OUTPUT: 's3:/my-bucket/runs'", "did you mean s3://my-bucket/runs?"], args=("--check",)),
    Case("base model hub URI with one slash", {"JOB_BASE_MODEL": "hf:/org/model"}, ExitCode.CONFIG,
         ["JOB_BASE_MODEL: 'hf:/org/model'", "did you mean hf://org/model?"]),
    Case("adapter hub URI without slashes", {"JOB_ADAPTER": "hf:org/adapter"}, ExitCode.CONFIG,
         ["JOB_ADAPTER: 'hf:org/adapter'", "did you mean hf://org/adapter?"]),
    Case("upper-case S3 scheme", {"JOB_DATA": "S3://my-bucket/d.jsonl"}, ExitCode.CONFIG,
         ["JOB_DATA: 'S3://my-bucket/d.jsonl'", "did you mean s3://my-bucket/d.jsonl?"]),
    Case("unsupported scheme for eval data", {"JOB_EVAL_DATA": "gs://my-bucket/e.jsonl"}, ExitCode.CONFIG,
         ["JOB_EVAL_DATA: 'gs://my-bucket/e.jsonl': unsupported scheme 'gs://'"]),
    Case("eval prompts URI with one slash", {"JOB_EVAL_PROMPTS": "s3:/my-bucket/p.txt"}, ExitCode.CONFIG,
         ["JOB_EVAL_PROMPTS: 's3:/my-bucket/p.txt'"]),
    Case("infinite learning rate", {"JOB_TRAIN__LEARNING_RATE": "inf"}, ExitCode.CONFIG,
         ["JOB_TRAIN__LEARNING_RATE: Input should be a finite number"]),
    Case("warm-up ratio of 1", {"JOB_TRAIN__WARMUP_RATIO": "1"}, ExitCode.CONFIG,
         ["JOB_TRAIN__WARMUP_RATIO: must be below 1", "JOB_TRAIN__WARMUP_STEPS"]),
    Case("answer mapped onto itself", {"JOB_COLUMNS__PROMPT": "output", "JOB_COLUMNS__COMPLETION": "output"}, ExitCode.CONFIG,
         ["JOB_COLUMNS__PROMPT and JOB_COLUMNS__COMPLETION both name column 'output'"]),
    Case("check with bad settings", {"JOB_TRAIN__OPTIM": "adam"}, ExitCode.CONFIG, ["JOB_TRAIN__OPTIM:"], args=("--check",)),
    Case("print-config with bad settings", {"JOB_LORA__ALPHA": "0"}, ExitCode.CONFIG, ["JOB_LORA__ALPHA:"], args=("--print-config",)),
    # ---- data: exit 3, file and row ----
    Case("data file missing", {"JOB_DATA": "{d}/nothing.jsonl"}, ExitCode.DATA, ["JOB_DATA: {d}/nothing.jsonl: no such file"]),
    Case("quoted data path", {"JOB_DATA": '"{d}/d.jsonl"'}, ExitCode.DATA,
         ["JOB_DATA: ", "{d}/d.jsonl", "keep quotes as part of the value; remove them"]),
    Case("bad row in the eval data", {"JOB_EVAL_DATA": "{d}/ev.jsonl"}, ExitCode.DATA,
         ["JOB_EVAL_DATA: {d}/ev.jsonl: row 2: missing field 'output'"], files={"ev.jsonl": J([{"text": "Q", "output": "A"}, {"text": "Q2"}])}),
    Case("UTF-16 file", {"JOB_DATA": "{d}/u16.jsonl"}, ExitCode.DATA, ["JOB_DATA: {d}/u16.jsonl: not valid UTF-8: it looks like UTF-16",
                                                                       "iconv -f utf-16 -t utf-8"], files={"u16.jsonl": GOOD_SFT.encode("utf-16")}),
    Case("empty file", {"JOB_DATA": "{d}/e.jsonl"}, ExitCode.DATA, ["{d}/e.jsonl: the file is empty"], files={"e.jsonl": ""}),
    Case("invalid JSON line", {"JOB_DATA": "{d}/b.jsonl"}, ExitCode.DATA, ["{d}/b.jsonl: row 2 (line 2): invalid JSON"],
         files={"b.jsonl": '{"text": "Q", "output": "A"}\n{"text": "Q2", "output": \n'}),
    Case("missing answer field", {"JOB_DATA": "{d}/b.jsonl"}, ExitCode.DATA, ["{d}/b.jsonl: row 2: missing field 'output'"],
         files={"b.jsonl": J([{"text": "Q", "output": "A"}, {"text": "Q2"}])}),
    Case("empty answer", {"JOB_DATA": "{d}/b.jsonl"}, ExitCode.DATA, ["{d}/b.jsonl: row 1: field 'output'", "empty"],
         files={"b.jsonl": J([{"text": "Q", "output": "  "}])}),
    Case("no recognised columns", {"JOB_DATA": "{d}/b.jsonl"}, ExitCode.DATA, ["{d}/b.jsonl: row 1: no recognised columns", "JOB_COLUMNS__PROMPT"],
         files={"b.jsonl": J([{"question": "Q", "answer": "A"}])}),
    Case("shift_jis CSV", {"JOB_DATA": "{d}/sj.csv"}, ExitCode.DATA, ["{d}/sj.csv: line 2: not valid UTF-8", "shift_jis"],
         files={"sj.csv": "text,output\n質問,回答\n".encode("shift_jis")}),
    Case("unsupported file type", {"JOB_DATA": "{d}/notes.txt"}, ExitCode.DATA, ["{d}/notes.txt: unsupported file type '.txt'"],
         files={"notes.txt": "hello"}),
    Case("folder without data files", {"JOB_DATA": "{d}/empty-dir"}, ExitCode.DATA, ["{d}/empty-dir: no data files"],
         files={"empty-dir/README.md": "nothing"}),
    Case("DPO pair with the same answers", {"JOB_STAGE": "dpo", "JOB_DATA": "{d}/same.jsonl"}, ExitCode.DATA,
         ["{d}/same.jsonl: row 1: 'chosen' and 'rejected' are the same answer"],
         files={"same.jsonl": J([{"prompt": "Q", "chosen": "A", "rejected": "A"}])}),
    Case("DPO CSV with an unknown header", {"JOB_STAGE": "dpo", "JOB_DATA": "{d}/h.csv"}, ExitCode.DATA,
         ["{d}/h.csv", "question", "JOB_COLUMNS__"],
         files={"h.csv": "question,good,bad\n日本の首都は？,東京です。,大阪です。\n"}),
    Case("header-less CSV with four columns", {"JOB_STAGE": "dpo", "JOB_DATA": "{d}/four.csv"}, ExitCode.DATA,
         ["{d}/four.csv", "4"], files={"four.csv": "日本の首都は？,東京です。,大阪です。,余分\n富士山の高さは？,3776メートル,3000メートル,余分\n"}),
    Case("pretty-printed JSON object", {"JOB_DATA": "{d}/obj.json"}, ExitCode.DATA, ["{d}/obj.json"],
         files={"obj.json": json.dumps({"text": "質問", "output": "回答"}, ensure_ascii=False, indent=2)}),
    Case("nothing fits MAX_LENGTH", {"JOB_DATA": "{d}/long.jsonl", "JOB_TRAIN__MAX_LENGTH": "8"}, ExitCode.DATA,
         ["JOB_TRAIN__MAX_LENGTH=8"], files={"long.jsonl": J([{"text": "質問", "output": "とても長い回答です。" * 5}])}),
    Case("eval fraction leaves nothing", {"JOB_EVAL_FRACTION": "0.9"}, ExitCode.DATA, ["JOB_EVAL_FRACTION=0.9"]),
    # MAX_LENGTH=12 on a 30-record set trained 2 answers to a prompt cut down to "<s>\n" and succeeded.
    Case("most of the data longer than MAX_LENGTH", {"JOB_DATA": "{d}/mixed.jsonl", "JOB_TRAIN__MAX_LENGTH": "30"}, ExitCode.DATA,
         ["train data: 10 of 30 examples (33%) are longer than JOB_TRAIN__MAX_LENGTH=30", "JOB_MAX_OVER_LENGTH_SHARE=0.1",
          "JOB_TRAIN__MAX_LENGTH=39 keeps 95% of them whole"], files={"mixed.jsonl": MIXED}),
    Case("check with most of the data longer than MAX_LENGTH", {"JOB_DATA": "{d}/mixed.jsonl", "JOB_TRAIN__MAX_LENGTH": "30"},
         ExitCode.DATA, ["10 of 30 examples (33%) are longer than JOB_TRAIN__MAX_LENGTH=30"], args=("--check",),
         files={"mixed.jsonl": MIXED}),
    # ---- training: exit 6 ----
    Case("learning rate that diverges", {"JOB_TRAIN__LEARNING_RATE": "1e30", "JOB_TRAIN__WARMUP_RATIO": "0",
                                         "JOB_TRAIN__MAX_STEPS": "2", "JOB_TRAIN__LOGGING_STEPS": "1", "JOB_EVAL_PROMPTS": "none"},
         ExitCode.DIVERGED, ["training diverged at step 2", "lower JOB_TRAIN__LEARNING_RATE (now 1e+30)"]),
    # ---- model: exit 4, named variable ----
    Case("base model folder missing", {"JOB_BASE_MODEL": "{d}/no-model"}, ExitCode.MODEL, ["JOB_BASE_MODEL:", "no-model"]),
    Case("base model without safetensors", {"JOB_BASE_MODEL": "{d}/pickled"}, ExitCode.MODEL,
         ["JOB_BASE_MODEL:", "no *.safetensors weights"]),
    Case("base model that needs remote code", {"JOB_BASE_MODEL": "{d}/remote-code"}, ExitCode.MODEL,
         ["JOB_TRUST_REMOTE_CODE=true"]),
    Case("adapter folder that is not an adapter", {"JOB_ADAPTER": "{d}/not-adapter"}, ExitCode.MODEL,
         ["JOB_ADAPTER:", "not a PEFT adapter"]),
    Case("base model weights cut short", {"JOB_BASE_MODEL": "{d}/truncated"}, ExitCode.MODEL,
         ["JOB_BASE_MODEL: {d}/truncated: model.safetensors is truncated or damaged"]),
    Case("LoRA on a container module", {"JOB_LORA__TARGET_MODULES": "self_attn"}, ExitCode.CONFIG,
         ["JOB_LORA__TARGET_MODULES: 'self_attn' is LlamaAttention layer, which LoRA can't adapt", "q_proj"]),
    Case("LoRA on a container module, --check", {"JOB_LORA__TARGET_MODULES": "self_attn"}, ExitCode.CONFIG,
         ["JOB_LORA__TARGET_MODULES: 'self_attn' is LlamaAttention layer, which LoRA can't adapt"], args=("--check",)),
    # ---- local disks ----
    Case("workdir is the output", {"JOB_WORKDIR": "{d}/out"}, ExitCode.CONFIG,
         ["JOB_WORKDIR={d}/out and JOB_OUTPUT={d}/out overlap"]),
    Case("workdir inside the output", {"JOB_WORKDIR": "{d}/out/scratch"}, ExitCode.CONFIG,
         ["JOB_WORKDIR={d}/out/scratch and JOB_OUTPUT={d}/out overlap"]),
    Case("adapter of another base model", {"JOB_ADAPTER": "{d}/other-adapter"}, ExitCode.MODEL,
         ["JOB_ADAPTER:", "does not fit JOB_BASE_MODEL"]),
]


def _prepare(case: Case, root: Path, tiny_model: Path, fixtures: dict) -> tuple[dict, Path]:
    d = root / case.name.replace(" ", "-")
    d.mkdir(parents=True)
    (d / "d.jsonl").write_text(GOOD_SFT, encoding="utf-8")
    (d / "p.jsonl").write_text(J([{"prompt": "Q", "chosen": "A", "rejected": "B"}]), encoding="utf-8")
    for rel, content in case.files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    for name, path in fixtures.items():
        (d / name).symlink_to(path)
    env = job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(tiny_model), JOB_DATA=str(d / "d.jsonl"), JOB_OUTPUT=str(d / "out"),
                  JOB_WORKDIR=str(d / "work"), JOB_RUN_ID="case", JOB_LOG_FORMAT="json", HF_TOKEN=FAKE_SECRET,
                  AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY=AWS_SECRET, JOB_TRAIN__MAX_STEPS="1")
    for k, v in case.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v.format(d=d)
    return env, d


@pytest.fixture(scope="module")
def fixtures(tiny_model, tmp_path_factory) -> dict:
    """Model-shaped folders the model cases point at."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from job.demo import build_tiny_model, demo_texts

    root = tmp_path_factory.mktemp("models")
    pickled = root / "pickled"
    shutil.copytree(tiny_model, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    remote = root / "remote-code"
    shutil.copytree(tiny_model, remote)
    cfg = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "model_type": "custom-llama", "auto_map": {"AutoConfig": "x.Config"}}))
    truncated = root / "truncated"
    shutil.copytree(tiny_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])  # a download cut short
    (root / "not-adapter").mkdir()
    (root / "not-adapter" / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes())
    other = build_tiny_model(root / "other-base", demo_texts(DEMO_DATA), hidden=32)
    get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=4, target_modules="all-linear")).save_pretrained(root / "other-adapter")
    return {"pickled": pickled, "remote-code": remote, "truncated": truncated, "not-adapter": root / "not-adapter", "other-adapter": root / "other-adapter"}


@pytest.fixture(scope="module")
def results(tiny_model, fixtures, tmp_path_factory, request) -> dict:
    # Only the cases this session runs (-k or a node id picks a few while working on them), each a Python process.
    chosen = {item.callspec.params["case"].name for item in request.session.items
              if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})}
    cases = [c for c in CASES if c.name in chosen]
    root = tmp_path_factory.mktemp("cases")
    prepared = {c.name: _prepare(c, root, tiny_model, fixtures) for c in cases}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {c.name: pool.submit(run_job, prepared[c.name][0], *c.args, timeout=600) for c in cases}
        return {name: (f.result(), prepared[name][1]) for name, f in futures.items()}


def test_the_catalog_is_large_enough():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, results):
    r, d = results[case.name]
    out = r.stdout + r.stderr
    assert r.returncode == case.code, f"exit {r.returncode}, expected {case.code}:\n{r.stderr[-3000:]}"
    for text in case.says:
        assert text.format(d=d) in out, f"{text.format(d=d)!r} not in:\n{r.stderr[-3000:]}"
    assert "Traceback" not in out
    assert FAKE_SECRET not in out and AWS_SECRET not in out
    assert not list((d / "out").rglob("_SUCCESS")) if (d / "out").is_dir() else True
    if not case.args:  # a run's error is one JSON log line with its exit code
        errors = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{") and '"error"' in line]
        assert errors and errors[-1]["exit_code"] == case.code
