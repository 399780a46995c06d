"""job/memplan.py: `auto` picks the fastest memory plan that fits, from the run's real lengths, and says so.

The decisions at llm-jp-3-13b's shape are checked against what was measured on the GPU (docs/benchmarks.md, "The
memory plan"); the planner's code path for a GPU runs here with the GPU's answers (free memory) given."""

from __future__ import annotations

import json
import random
import sys
import types

import pytest

from conftest import ROOT, four_bit_lora_model, run_sft_in_process, tokenized

GIB = 2**30
BASE = {"JOB_BASE_MODEL": "/m", "JOB_DATA": "/d", "JOB_OUTPUT": "/o"}
COPY_13B = int(23.63 * GIB)  # the dequantized copy of llm-jp-3-13b's linear layers (measured)
TRAINABLE_13B = 16 * 40 * (8 * 5120 + 3 * (5120 + 13824))  # LoRA r=16 on every linear layer


def settings(stage: str, **extra):
    from job.settings import load_settings

    return load_settings({"JOB_STAGE": stage, **BASE, **{k: str(v) for k, v in extra.items()}})


def model_13b():
    from transformers import LlamaConfig

    return types.SimpleNamespace(config=LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                                    vocab_size=99584))


@pytest.fixture(scope="module")
def bench_pairs(tmp_path_factory) -> list[dict]:
    """The benchmark's 97 preference pairs (bench/synth.py, its word-level tokenizer with llm-jp-3's vocabulary size)
    as the pipeline fits them: the data the 13B DPO peaks in docs/benchmarks.md were measured on."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import synth
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from job.model import load_tokenizer

    d = tmp_path_factory.mktemp("tok")
    synth.build_tokenizer(d)
    tok, _ = load_tokenizer(d, None, "auto")
    pairs = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in synth.dpo_records(97)]
    return tokenized(tok, "dpo", pairs, 1024)


def plan(stage: str, free_gib: float, rows=None, **extra):
    from job import memplan

    s = settings(stage, **extra)
    work = memplan.workload(s, rows)
    return memplan.choose(s, model_13b(), work, liger=True, cuda=True, free=int(free_gib * GIB), copy_bytes=COPY_13B,
                          trainable=TRAINABLE_13B)


def shape(p) -> tuple:
    return ("off" if p.offload else "gc" if p.checkpointing else "keep", p.dequantized, p.micro_batch)


def test_13b_plans_match_the_fastest_measured_layout_that_fit_on_each_card(bench_pairs):
    """Free memory once the 4-bit 13B is loaded: ~71 GiB on an 80 GiB card, ~131 on an H200, ~15 with 23 GiB free.
    Measured (docs/benchmarks.md): on 80 GiB, SFT with the copy 7,787 vs 6,814 tokens/s without (71.4 GiB peak);
    DPO 8 pairs per micro-batch without the copy 8.92 pairs/s vs 7.84 with 4 and the copy, 6.86 with 4 and neither;
    on the H200 SFT 8 rows with the copy 8,733; with little memory 8 checkpointed rows 6,138 vs 4 rows 4,534-5,055."""
    pairs = bench_pairs
    assert shape(plan("sft", 71)) == ("keep", True, 4)
    assert shape(plan("dpo", 71, pairs)) == ("keep", False, 8)
    assert shape(plan("sft", 131)) == ("keep", True, 8)
    low = plan("sft", 14.5)
    assert low.checkpointing and low.micro_batch >= 8 and not low.dequantized  # never the set 4 rows
    assert plan("dpo", 14.5, pairs).checkpointing and plan("dpo", 14.5, pairs).micro_batch >= 8


def test_dpo_is_sized_from_the_real_pairs_not_every_row_at_max_length(bench_pairs):
    """Control: sized as if every row were MAX_LENGTH (no rows given), DPO on an 80 GiB card keeps 4 pairs per
    micro-batch (6.86 pairs/s measured) where the real pairs let 8 fit (8.92)."""
    from job import memplan

    pairs = bench_pairs
    s = settings("dpo")
    real, assumed = memplan.workload(s, pairs), memplan.workload(s, None)
    assert (real.worst[4], real.worst[8]) == (5049, 8133) and assumed.worst[4] == 8192  # 5,049: 32.4 GiB measured
    assert plan("dpo", 71).micro_batch == 4 and plan("dpo", 71, pairs).micro_batch == 8


def test_the_worst_micro_batch_is_the_one_the_trainer_draws(tiny_model, tmp_path):
    """The replayed sampler is the trainer's: every micro-batch a DPO trainer's dataloader yields over two epochs, as
    tokens computed (padding-free: chosen and rejected rows, prompt each), is at most the planner's worst, which one
    of them equals. Padded (JOB_TRAIN__PACKING=false): the batch's rows times its longest."""
    from job import memplan
    from job.model import load_base_model, load_tokenizer
    from job.stages import dpo

    tok, _ = load_tokenizer(tiny_model, None, "auto")
    rng = random.Random(3)
    words = "a b c d e f g h".split()
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    records = [{"prompt": [{"role": "user", "content": text(rng.randint(2, 40))}],
                "chosen": [{"role": "assistant", "content": text(rng.randint(1, 30))}],
                "rejected": [{"role": "assistant", "content": text(rng.randint(1, 30))}]} for _ in range(24)]
    rows = tokenized(tok, "dpo", records, 256)
    for packing in ("true", "false"):
        s = settings("dpo", JOB_BASE_MODEL=tiny_model, JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE=2,
                     JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS=2, JOB_TRAIN__NUM_TRAIN_EPOCHS=2, JOB_TRAIN__PACKING=packing)
        work = memplan.workload(s, rows, padding_free=packing == "true")
        trainer = dpo.build_trainer(s, load_base_model(tiny_model, s), tok, rows, None, tmp_path / packing, [],
                                    progress_bar=False, micro_batch_rows=2)
        seen = []
        for epoch in range(2):
            loader = trainer.get_train_dataloader()
            sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or loader.sampler
            sampler.set_epoch(epoch)
            for batch in loader:  # padding-free: the real tokens; padded: the padded batch
                seen.append(int(batch["attention_mask"].sum()) if packing == "true" else batch["input_ids"].numel())
        assert max(seen) <= work.worst[2], (packing, max(seen), work.worst[2])
        if packing == "true":
            assert max(seen) == work.worst[2]


def test_settings_and_a_retry_s_forced_choices_limit_what_auto_weighs(bench_pairs):
    pairs = bench_pairs
    p = plan("sft", 71, JOB_TRAIN__GRADIENT_CHECKPOINTING="true")
    assert p.checkpointing and p.micro_batch == 16 and p.dequantized  # room for all of it, checkpointed
    assert not plan("sft", 71, JOB_QUANT__KEEP_DEQUANTIZED="false").dequantized
    assert plan("sft", 131, JOB_TRAIN__MERGE_MICRO_BATCHES="false").micro_batch == 4
    assert not plan("sft", 14.5, JOB_TRAIN__OFFLOAD_CHECKPOINTS="false").offload
    # Padded DPO is left as set (a larger micro-batch pads more: not measured to pay).
    assert plan("dpo", 131, pairs, JOB_TRAIN__PACKING="false").micro_batch == 4
    from job import memplan

    s = settings("sft")
    forced = memplan.choose(s, model_13b(), memplan.workload(s, None), liger=True, cuda=True, free=131 * GIB,
                            copy_bytes=COPY_13B, trainable=TRAINABLE_13B, micro_batch_rows=4, keep_dequantized=False)
    assert (forced.micro_batch, forced.dequantized, forced.checkpointing) == (4, False, False)


def test_nothing_fits_the_smallest_plan_is_tried_and_the_report_says_so():
    p = plan("sft", 3)
    assert shape(p) == ("off", False, 4) and p.report["fits"] is False


def test_the_plan_is_made_on_the_gpu_path_and_reported_beside_the_measured_peak(tiny_model, tmp_path, monkeypatch):
    """The planner's GPU code path on this machine, the GPU's answers given: free memory, what is allocated; the run
    trains with the plan and metrics.json's `memory_plan` carries it with the estimated and measured peak."""
    import torch

    from job.outputs import memory_plan_report
    from job.stages import common

    model = four_bit_lora_model(tiny_model)
    s = settings("sft", JOB_BASE_MODEL=tiny_model, JOB_TRAIN__MAX_LENGTH=64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (40 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 8 * GIB)
    p = common.memory_plan(s, model, None)
    assert p.report["auto"] and p.report["free_gib"] == 40 and p.report["allocated_before_gib"] == 8
    assert not p.checkpointing and p.micro_batch == 16  # a tiny model: everything fits
    out = memory_plan_report(p.report, 9.5)
    assert out["estimated_peak_gib"] == round(8 + p.report["chosen"]["estimated_gib"], 2) and out["measured_peak_gib"] == 9.5


def test_a_cpu_run_reports_that_no_plan_was_needed(tiny_model, tmp_path):
    out = run_sft_in_process(tiny_model, tmp_path, "cpu")
    m = json.loads((out / "metrics.json").read_text())
    assert m["memory_plan"] == {"auto": False, "why": "no GPU"}


def test_rows_the_trainer_tokenizes_itself_are_sized_at_max_length():
    """Rows that are not the job's fitted token rows (a dataset TRL tokenizes) can't be replayed: every row counts as
    MAX_LENGTH tokens, the most it can hold, instead of failing."""
    from job import memplan

    rows = [{"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": []}] * 8
    assert memplan.workload(settings("dpo"), rows).worst[4] == 8 * 1024


def test_experts_and_eager_attention_count_what_they_keep():
    """A mixture of experts keeps each token's MLP activations once per expert it is routed to; transformers' eager
    attention (Gemma-2's softcap) keeps each row's heads x length scores. Controls: the same shapes without them."""
    from transformers import Gemma2Config, MistralConfig, MixtralConfig

    from job import memplan

    dense = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32)
    moe = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_experts_per_tok=2)
    mlp = memplan.per_layer_bytes(dense, True) - memplan.per_layer_bytes(MistralConfig(hidden_size=4096, intermediate_size=0,
                                                                                   num_hidden_layers=32), True)
    assert memplan.per_layer_bytes(moe, True) == memplan.per_layer_bytes(dense, True) + mlp
    gemma = Gemma2Config(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16)
    gemma._attn_implementation = "eager"
    flash = Gemma2Config(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16)
    flash._attn_implementation = "sdpa"
    assert memplan.per_layer_bytes(gemma, True, 1024) - memplan.per_layer_bytes(flash, True, 1024) == 16 * 1024 * 8


def test_a_recorded_micro_batch_the_settings_no_longer_offer_is_still_sized():
    """A retried pod group may start with a micro-batch an earlier attempt recorded (job/pipeline.py): sized from the
    replayed ones in proportion, not a KeyError."""
    from job import memplan

    s = settings("sft")
    p = memplan.choose(s, model_13b(), memplan.workload(s, None), liger=True, cuda=True, free=71 * GIB,
                       copy_bytes=COPY_13B, trainable=TRAINABLE_13B, micro_batch_rows=2)
    assert p.micro_batch == 2 and p.report["worst_micro_batch_tokens"] == 2048


@pytest.fixture(scope="module")
def meta_13b():
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_13b().config)


def test_the_loaded_size_and_the_copy_of_a_13b_match_what_the_gpu_measured(meta_13b):
    """From the modules on the meta device, before any weights: llm-jp-3-13b loaded in 4-bit took 8.02-8.08 GiB
    (r24a) and its dequantized copy 23.63 GiB (metrics.json `dequantized_copy_gib`)."""
    from job import memplan

    load, copy = memplan.load_bytes(meta_13b, settings("sft").quant)
    assert 7.9 < load / GIB < 8.1 and 23.5 < copy / GIB < 23.7
    full, none = memplan.load_bytes(meta_13b, settings("sft", JOB_QUANT__LOAD_IN="none").quant)
    assert 25 < full / GIB < 27 and none == 0  # bf16: no 4-bit weights to copy


def test_check_refuses_a_model_that_cannot_fit_before_downloading_it(meta_13b, monkeypatch):
    """--check and the preflight: on a GPU with too little free memory for the weights and the smallest plan, exit 5
    naming JOB_BASE_MODEL and the sizes; with room, the plan `auto` is expected to choose. Without a GPU: nothing."""
    import torch

    from job import memplan
    from job.errors import OutOfMemory

    s = settings("sft")
    assert memplan.preview(s, meta_13b, None, "cpu", padding_free=True) == {"auto": False, "why": "no GPU"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memplan, "liger_on", lambda s: True)  # as in the image (not on this CPU machine)
    free = {"gib": 6.0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free["gib"] * GIB), 80 * GIB))
    with pytest.raises(OutOfMemory) as e:
        memplan.preview(s, meta_13b, None, "cuda:0", padding_free=True)
    assert e.value.exit_code == 5 and "JOB_BASE_MODEL: this GPU has 6.0 GiB free" in str(e.value)
    assert "~8.0 GiB loaded (4bit)" in str(e.value) and "JOB_TRAIN__MAX_LENGTH" in str(e.value)
    free["gib"] = 23.0  # an L4 or A10G: the model fits, training with checkpointing
    p = memplan.preview(s, meta_13b, None, "cuda:0", padding_free=True)
    assert p["predicted"] and 7.9 < p["model_gib"] < 8.1 and p["chosen"]["checkpointing"]
    free["gib"] = 78.7  # an 80 GiB card: as measured (r24a), the copy and 4 rows without checkpointing
    p = memplan.preview(s, meta_13b, None, "cuda:0", padding_free=True)
    assert p["chosen"]["dequantized"] and not p["chosen"]["checkpointing"] and p["chosen"]["micro_batch"] == 4
