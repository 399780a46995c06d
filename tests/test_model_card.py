"""The adapter's model card (README.md beside the weights): its usage snippet runs as written on the installed
transformers, and the adapter names its base model by a name that means something outside the pod."""

import json
import re
import subprocess
import sys

import pytest
import torch

from job import outputs

from conftest import job_env


def snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=job_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture
def trained(tiny_model):
    """A PEFT model and tokenizer as a stage leaves them (the job's instruction format as chat template)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.model import INSTRUCTION_TEMPLATE

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = INSTRUCTION_TEMPLATE
    return model, tok


def test_the_card_snippet_runs_as_written(trained, tiny_model, tmp_path):
    model, tok = trained
    runs = tmp_path / "runs"
    dest = runs / "r1" / "adapter"  # where JOB_OUTPUT=runs puts run r1's adapter
    outputs.write_adapter(dest, model, tok, "instruction", base=str(tiny_model), data="s3://bucket/sft.jsonl",
                          run_id="r1", stage="sft", output=str(runs))
    code = snippet((dest / "README.md").read_text())
    assert f'adapter = "{dest.resolve()}"' in code
    (tmp_path / "elsewhere").mkdir()
    ran = run_python(code, cwd=tmp_path / "elsewhere")  # the path it names is absolute
    assert ran.returncode == 0, ran.stderr[-3000:]

    # Control: the card's former usage (apply_chat_template's result straight into generate) fails on this
    # transformers, so a snippet that still did it would fail above.
    old = code.split("inputs = tok.apply_chat_template")[0] + (
        'ids = tok.apply_chat_template([{"role": "user", "content": "質問"}], add_generation_prompt=True, '
        'return_tensors="pt")\nmodel.generate(ids, max_new_tokens=4)\n')
    broken = run_python(old, cwd=tmp_path)
    assert broken.returncode != 0 and "AttributeError" in broken.stderr


@pytest.mark.parametrize("base,recorded,revision,metadata", [
    ("hf://org/base-model@v1", "org/base-model", "v1", "base_model: org/base-model"),
    ("org/base-model", "org/base-model", None, "base_model: org/base-model"),
    ("s3://bucket/models/base/", "s3://bucket/models/base/", None, None),
])
def test_the_adapter_names_its_base_not_the_download_folder(trained, tmp_path, base, recorded, revision, metadata):
    """PEFT records the folder the base was loaded from: in a pod, a scratch folder that is gone after the run."""
    model, tok = trained
    dest = tmp_path / "adapter"
    outputs.write_adapter(dest, model, tok, "instruction", base=base, data="d.jsonl", run_id="r1", stage="sft",
                          output="hf://org/runs")
    config = json.loads((dest / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == recorded and config.get("revision") == revision
    card = (dest / "README.md").read_text()
    header = card.split("---")[1]
    # The Hub accepts only a model id as base_model (and links the adapter to it); an S3 URI stays out of the header.
    assert (metadata in header) if metadata else ("base_model" not in header)
    assert 'PeftModel.from_pretrained(base, adapter, subfolder="r1/adapter")' in card and 'adapter = "org/runs"' in card


def test_the_published_card_has_the_hubs_metadata_the_held_out_figures_and_the_adapter_it_started_from(trained, tmp_path):
    """publish completes the card from run.json and metrics.json (the adapter is written before the final
    evaluation): Hub metadata (base_model with its relation, library_name, datasets, tags, eval results as
    model-index, read back by huggingface_hub's own parser), the 4-bit base it was trained on, and for DPO the
    adapter it started from."""
    from huggingface_hub import ModelCard

    from job.settings import load_settings

    model, tok = trained
    out = tmp_path / "out"
    s = load_settings({"JOB_STAGE": "dpo", "JOB_BASE_MODEL": "hf://org/base@v1", "JOB_DATA": "hf://datasets/org/prefs/dpo.csv",
                       "JOB_EVAL_DATA": "s3://bucket/eval.jsonl", "JOB_ADAPTER": "s3://bucket/runs/sft-1/adapter/",
                       "JOB_OUTPUT": str(tmp_path / "runs")})
    outputs.write_adapter(out / "adapter", model, tok, "instruction", base=s.base_model, data=s.data, run_id="dpo-1",
                          stage="dpo", output=s.output)
    metrics = {"stage": "dpo", "eval_loss": 0.61, "eval_reward_accuracy": 0.75, "eval_reward_margin": 0.4,
               "generation_exact_match_after": None}
    outputs.write_json(out / "metrics.json", metrics)
    outputs.write_json(out / "run.json", {"run_id": "dpo-1", "stage": "dpo", "prompt_format": "instruction",
                                          "config": s.masked()})
    outputs.publish(out, outputs.storage.parse_uri(str(tmp_path / "runs" / "dpo-1")), None)

    card = (tmp_path / "runs" / "dpo-1" / "adapter" / "README.md").read_text()
    data = ModelCard(card).data
    assert (data.base_model, data.base_model_relation, data.library_name) == ("org/base", "adapter", "peft")
    assert data.datasets == ["org/prefs"] and {"qlora-job", "dpo", "lora", "qlora"} <= set(data.tags)
    results = {r.metric_name: (r.metric_type, r.metric_value, r.dataset_name) for r in data.eval_results}
    assert results == {"held-out loss": ("loss", 0.61, "s3://bucket/eval.jsonl"),
                       "held-out reward accuracy": ("accuracy", 0.75, "s3://bucket/eval.jsonl"),
                       "held-out reward margin": ("reward_margin", 0.4, "s3://bucket/eval.jsonl")}
    assert "quantized to 4-bit NF4 (QLoRA: bitsandbytes, double quantization, bfloat16 compute)" in card
    assert "It started from the adapter `s3://bucket/runs/sft-1/adapter/`, also DPO's frozen reference." in card
    assert "| held-out reward accuracy | 0.75 |" in card
    # The snippet still runs as written (the header above it changed, not the code).
    assert 'PeftModel.from_pretrained(base, adapter)' in snippet(card)


def test_the_merged_cards_header_names_its_base_as_a_merge_with_the_comparison_as_eval_results():
    """job/stages/merge.py's header, read back by huggingface_hub: a Hub base with `base_model_relation: merge`, and
    the comparison with the trained model as eval results on the data it was measured on."""
    from huggingface_hub import ModelCard

    from job.stages import merge

    metrics = {"eval_loss_merged": 1.25, "eval_loss_trained": 1.2, "kl_per_token": 2e-6, "greedy_agreement": 0.875}
    header = outputs.card_metadata(base_model="org/base", relation="merge", tags=["qlora-job", "merged"], model_name="m1",
                                   results=merge._card_results(metrics), results_data="hf://datasets/org/qa/eval.jsonl")
    data = ModelCard(f"---\n{header}---\n# m1\n").data
    assert (data.base_model, data.base_model_relation, data.library_name) == ("org/base", "merge", None)
    got = {r.metric_type + ":" + r.metric_name: (r.metric_value, r.dataset_type) for r in data.eval_results}
    assert got["kl_divergence:mean per-token KL from the trained model"] == (2e-6, "org/qa")
    assert got["agreement:greedy answers equal to the trained model's"] == (0.875, "org/qa")
    assert len(got) == 4
