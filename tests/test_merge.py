"""JOB_STAGE=merge: the adapter merged into the base in 16 (here 32) bits, as a folder that loads and serves as is.

The adapter is built with PEFT with random (non-zero) A and B, so that it changes the model's logits far beyond the
tolerance of the comparison: a merge that dropped or mis-scaled it fails (the control below checks that margin)."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml

from job.exitcodes import ExitCode

from conftest import DEMO_DATA, FAKE_SECRET, job_env, keys, run_job, upload_dir

QUESTION = [{"role": "user", "content": "日本の首都はどこですか?"}]


def build_adapter(tiny_model, dest):
    """An adapter as the job writes one (weights, tokenizer with the instruction format, prompt_format.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job import outputs
    from job.model import INSTRUCTION_TEMPLATE

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                                      task_type="CAUSAL_LM"))
    model.save_pretrained(dest)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = INSTRUCTION_TEMPLATE
    tok.save_pretrained(dest)
    outputs.write_prompt_format(dest, tok, "instruction")
    return dest


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_merge_on_s3_equals_base_plus_adapter_and_serves_as_is(s3, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    adapter = build_adapter(tiny_model, tmp_path / "adapter")
    upload_dir(s3, s3.bucket, tiny_model, "models/tiny")
    upload_dir(s3, s3.bucket, adapter, "runs/sft-1/adapter")
    r = run_job(job_env(**s3.env, HF_TOKEN=FAKE_SECRET, JOB_STAGE="merge", JOB_BASE_MODEL=f"s3://{s3.bucket}/models/tiny/",
                        JOB_ADAPTER=f"s3://{s3.bucket}/runs/sft-1/adapter/", JOB_OUTPUT=f"s3://{s3.bucket}/runs",
                        JOB_RUN_ID="merge-1", JOB_QUANT__COMPUTE_DTYPE="float32", JOB_WORKDIR=str(tmp_path / "work"),
                        JOB_MERGE__BASE="original", JOB_LOG_FORMAT="json"))
    assert r.returncode == 0, r.stderr[-3000:]

    names = [k.removeprefix("runs/merge-1/") for k in keys(s3, s3.bucket, "runs/merge-1/")]
    for name in ("_SUCCESS", "run.json", "merged/config.json", "merged/generation_config.json", "merged/model.safetensors",
                 "merged/tokenizer.json", "merged/tokenizer_config.json", "merged/chat_template.jinja",
                 "merged/prompt_format.json", "merged/README.md"):
        assert name in names, name
    # A plain model: no adapter file that would make transformers load it as a PEFT adapter.
    assert not [n for n in names if "adapter" in n]
    dl = tmp_path / "dl"
    for name in names:
        (dl / name).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(s3.bucket, f"runs/merge-1/{name}", str(dl / name))
    merged_dir = dl / "merged"

    tok = AutoTokenizer.from_pretrained(merged_dir)
    # The prompt format is the merged model's chat template: what training saw, and what a server applies.
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt == AutoTokenizer.from_pretrained(adapter).apply_chat_template(QUESTION, add_generation_prompt=True,
                                                                               tokenize=False)
    assert "### 指示\n日本の首都はどこですか?\n### 回答\n" in prompt
    eos = GenerationConfig.from_pretrained(merged_dir).eos_token_id  # generation stops where training examples ended
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])

    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.float32 and not hasattr(merged, "peft_config")
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), ids)
    reference = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                                 adapter), ids)
    got = logits(merged, ids)
    tolerance = 1e-4
    assert (got - reference).abs().max() < tolerance
    # Control: the adapter moves the logits far more than the tolerance, so a merge that lost it would fail above.
    assert (base - reference).abs().max() > 1000 * tolerance

    run = json.loads((dl / "run.json").read_text())
    assert run["stage"] == "merge" and run["status"] == "succeeded" and run["dtype"] == "float32"
    assert run["inputs"]["adapter"]["uri"] == f"s3://{s3.bucket}/runs/sft-1/adapter/"
    assert run["inputs"]["base_model"]["files"]["model.safetensors"]["etag"]
    assert run["config"]["hf_token"] == "***"
    for p in dl.rglob("*"):
        assert not p.is_file() or FAKE_SECRET.encode() not in p.read_bytes(), p
    assert FAKE_SECRET not in r.stderr + r.stdout

    # The merged model card's snippet runs as written, from the folder the S3 sync it names leaves behind.
    card = (merged_dir / "README.md").read_text()
    assert f"aws s3 sync s3://{s3.bucket}/runs/merge-1/merged/ merged" in card
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    ran = subprocess.run([sys.executable, "-c", code], cwd=dl, env=job_env(), capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]


def test_merge_in_process_defaults_to_bfloat16(tiny_model, tmp_path):
    """Without JOB_QUANT__COMPUTE_DTYPE the base is merged in bfloat16 (QLoRA's compute dtype), whatever the dtype of
    its checkpoint (the tiny model is saved in float32); local paths in and out. (The original base: compared below
    with the float32 checkpoint plus the adapter.)"""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from job.settings import load_settings
    from job.stages import merge

    adapter = build_adapter(tiny_model, tmp_path / "adapter")
    s = load_settings({"JOB_STAGE": "merge", "JOB_BASE_MODEL": str(tiny_model), "JOB_ADAPTER": str(adapter),
                       "JOB_OUTPUT": str(tmp_path / "out"), "JOB_RUN_ID": "m1", "JOB_WORKDIR": str(tmp_path / "work"),
                       "JOB_MERGE__BASE": "original"})
    out = merge.run(s)
    merged_dir = tmp_path / "out" / "m1" / "merged"
    assert out == str(tmp_path / "out" / "m1") and (tmp_path / "out" / "m1" / "_SUCCESS").is_file()
    with safe_open(merged_dir / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    ids = torch.tensor([[1, 20, 33, 47, 5, 100]])
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16), adapter)
    diff = (logits(AutoModelForCausalLM.from_pretrained(merged_dir), ids) - logits(reference, ids)).abs().max()
    assert diff < 0.05 * logits(reference, ids).abs().max()  # bfloat16 rounding of W + BA, not a missing adapter
    # Run again with the same run id: it already succeeded, so nothing is redone.
    stamp = (tmp_path / "out" / "m1" / "_SUCCESS").stat().st_mtime_ns
    assert merge.run(s) == out and (tmp_path / "out" / "m1" / "_SUCCESS").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("env,message", [
    ({"JOB_STAGE": "merge"}, "JOB_ADAPTER: required for JOB_STAGE=merge"),
    ({"JOB_STAGE": "sft"}, "JOB_DATA: required for JOB_STAGE=sft"),
])
def test_what_each_stage_requires(env, message):
    from job.errors import ConfigError
    from job.settings import load_settings

    with pytest.raises(ConfigError, match=message) as e:
        load_settings({"JOB_BASE_MODEL": "org/model", "JOB_OUTPUT": "s3://bucket/runs", **env})
    assert e.value.exit_code == ExitCode.CONFIG
    # merge reads no data, so JOB_DATA is not asked for
    assert (env["JOB_STAGE"] == "merge") == ("JOB_DATA" not in str(e.value))


def test_merge_refuses_an_adapter_that_does_not_fit(tiny_model, tmp_path):
    """An adapter for another architecture fails as a model problem (exit 4) before anything is written."""
    from job.demo import build_tiny_model, demo_texts

    other = build_tiny_model(tmp_path / "other", demo_texts(DEMO_DATA), hidden=32)
    adapter = build_adapter(other, tmp_path / "adapter")
    r = run_job(job_env(JOB_STAGE="merge", JOB_BASE_MODEL=str(tiny_model), JOB_ADAPTER=str(adapter),
                        JOB_OUTPUT=str(tmp_path / "out"), JOB_WORKDIR=str(tmp_path / "work"), JOB_LOG_FORMAT="json"))
    assert r.returncode == ExitCode.MODEL, r.stderr[-3000:]
    assert "JOB_ADAPTER:" in r.stderr and "does not fit JOB_BASE_MODEL" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_dequantized_base_computes_what_was_trained_and_the_merge_measures_it(tiny_model, tmp_path):
    """JOB_MERGE__BASE=dequantized merges into the 4-bit base dequantized (the weights the adapter was trained with);
    each merge compares itself with the trained model (4-bit base + adapter) on JOB_EVAL_DATA, writes the figures in
    metrics.json and its model card, and prints them in its closing summary. Control: the original base, which
    differs from the trained model by the quantization error, is measured as farther. A bad JOB_EVAL_DATA fails
    before the weights, naming the variable and the row."""
    adapter = build_adapter(tiny_model, tmp_path / "adapter")
    (tmp_path / "bad.jsonl").write_text('{"text": "質問", "output": "回答"}\n{"text": 3}\n', encoding="utf-8")

    def env(run_id, **extra):
        return job_env(**{"JOB_STAGE": "merge", "JOB_BASE_MODEL": str(tiny_model), "JOB_ADAPTER": str(adapter),
                          "JOB_RUN_ID": run_id, "JOB_OUTPUT": str(tmp_path / "out"), "JOB_WORKDIR": str(tmp_path / run_id),
                          "JOB_EVAL_DATA": str(DEMO_DATA / "sft.jsonl"), "JOB_LOG_FORMAT": "json", **extra})

    with ThreadPoolExecutor(3) as pool:
        deq, orig, bad = pool.map(run_job, [env("deq"), env("orig", JOB_MERGE__BASE="original"),
                                            env("bad", JOB_EVAL_DATA=str(tmp_path / "bad.jsonl"))])
    m = {}
    for name, r in (("deq", deq), ("orig", orig)):
        assert r.returncode == 0, r.stderr[-3000:]
        m[name] = json.loads((tmp_path / "out" / name / "metrics.json").read_text())
        assert m[name]["compared_on"] == "JOB_EVAL_DATA" and m[name]["compared_tokens"] > 100, m[name]
        assert m[name]["greedy_prompts"] == 8 and 0 <= m[name]["greedy_agreement"] <= 1
        assert 0 <= m[name]["kl_per_token"] and m[name]["eval_loss_trained"] > 0 and m[name]["eval_loss_merged"] > 0
        assert f"qlora-job merge finished: {tmp_path / 'out' / name}" in r.stdout and "KL" in r.stdout
    assert m["deq"]["base"] == "dequantized" and m["orig"]["base"] == "original"  # the default, and as set
    # Both compare with the same trained model on the same tokens.
    assert m["deq"]["eval_loss_trained"] == m["orig"]["eval_loss_trained"]
    assert m["deq"]["compared_tokens"] == m["orig"]["compared_tokens"]
    # The dequantized merge computes what was trained, up to bfloat16 rounding of W + BA; the original base is
    # measurably farther (on this model, ~25x in KL).
    assert m["deq"]["kl_per_token"] < 1e-5 and abs(m["deq"]["eval_loss_merged"] - m["deq"]["eval_loss_trained"]) < 1e-3
    assert m["orig"]["kl_per_token"] > 5 * m["deq"]["kl_per_token"]
    assert m["deq"]["greedy_agreement"] > m["orig"]["greedy_agreement"]
    # The merged card carries the Hub's metadata and the figures.
    card = (tmp_path / "out" / "deq" / "merged" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "merged" in meta["tags"] and "base_model" not in meta  # a local base is no Hub id (test_hub: one that is)
    figures = {x["name"]: x["value"] for x in meta["model-index"][0]["results"][0]["metrics"]}
    assert figures["mean per-token KL from the trained model"] == m["deq"]["kl_per_token"]
    assert "dequantized from nf4" in card

    assert bad.returncode == ExitCode.DATA, bad.stderr[-3000:]
    assert f"JOB_EVAL_DATA: {tmp_path / 'bad.jsonl'}: row 2" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "out" / "bad").exists()
    assert not list((tmp_path / "bad").rglob("*.safetensors"))  # failed before the weights came


def test_merge_base_is_one_of_two_names():
    from job.errors import ConfigError
    from job.settings import load_settings

    with pytest.raises(ConfigError, match="JOB_MERGE__BASE: .*'16bit'"):
        load_settings({"JOB_STAGE": "merge", "JOB_BASE_MODEL": "org/model", "JOB_ADAPTER": "a/", "JOB_OUTPUT": "out",
                       "JOB_MERGE__BASE": "16bit"})


def test_no_module_below_the_pipeline_imports_it():
    """job/pipeline.py is the top of a run: a stage that imported it (merge took its process state) made an import
    cycle. Process coordination lives below both, in job/distributed.py."""
    import ast
    from pathlib import Path

    import job

    root = Path(job.__file__).parent
    importers = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] + [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module else []
            if "job.pipeline" in names:
                importers.append(path.relative_to(root).as_posix())
    assert set(importers) <= {"__main__.py", "demo.py"}, importers  # the entry points, above it


def test_merge_settings_are_not_part_of_a_training_runs_identity():
    """JOB_MERGE__* concerns a later merge: setting it (or a version that added it) doesn't make an SFT run another run."""
    from job import preflight
    from job.settings import load_settings

    env = {"JOB_STAGE": "sft", "JOB_BASE_MODEL": "org/model", "JOB_DATA": "d.jsonl", "JOB_OUTPUT": "out"}
    inputs, models = preflight.Inputs(train=[], eval=[]), {"base_model": {"repo_id": "org/model"}, "adapter": None}
    default, original = (preflight.identity(load_settings({**env, **extra}), inputs, models)
                         for extra in ({}, {"JOB_MERGE__BASE": "original"}))
    assert "merge" not in default["config"] and default["sha256"] == original["sha256"]
