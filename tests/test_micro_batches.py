"""JOB_TRAIN__MERGE_MICRO_BATCHES: a step's rows in fewer, larger micro-batches train the same adapter (the same rows
and gradient per step), are chosen by `auto` only where the GPU has room, are the first thing a run that runs out of
memory gives back, and may differ between attempts of one run. The speed they buy is measured on the GPU
(docs/benchmarks.md, levers 10-12)."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO_DATA, plan_as_on_a_big_gpu

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SETTINGS = {"JOB_BASE_MODEL": "/m", "JOB_DATA": "/d", "JOB_OUTPUT": "/o"}
#: The comparisons compute in fp32: in bf16 the same sums over differently shaped micro-batches round differently
#: (DPO's padded rows: 0.3% of the update apart in bf16, 4e-7 in fp32; the claim is about the arithmetic, not rounding).
FP32 = {"JOB_QUANT__COMPUTE_DTYPE": "float32", "JOB_TRAIN__BF16": "false"}


def _run(tiny_model, tmp_path, run_id, stage="sft", **env):
    from job import pipeline
    from job.settings import load_settings

    data = DEMO_DATA / ("sft.jsonl" if stage == "sft" else "dpo.csv")
    # No LoRA dropout: its random masks are drawn per micro-batch, so only without it are two splits bit-comparable.
    base = {"JOB_STAGE": stage, "JOB_BASE_MODEL": str(tiny_model), "JOB_DATA": str(data), "JOB_EVAL_FRACTION": "0",
            "JOB_OUTPUT": str(tmp_path / "out"), "JOB_WORKDIR": str(tmp_path / "w" / run_id), "JOB_TRAIN__MAX_STEPS": "2",
            "JOB_TRAIN__SAVE_STEPS": "0", "JOB_TRAIN__MAX_LENGTH": "128", "JOB_EVAL_PROMPTS": "none",
            "JOB_LORA__DROPOUT": "0", "JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": "2", "JOB_RUN_ID": run_id,
            "JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS": "2" if stage == "sft" else "3",
            # Plain SGD: an update proportional to the gradient. (Adam's normalisation turns float-rounding differences
            # in near-zero gradients, such as a new LoRA A's in its second step, into differences of a whole step.)
            "JOB_TRAIN__OPTIM": "sgd", "JOB_TRAIN__LEARNING_RATE": "0.5", "JOB_TRAIN__WARMUP_RATIO": "0", **env}
    pipeline.run(load_settings(base))
    return tmp_path / "out" / run_id


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def _max_difference(a, b) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_step_in_one_micro_batch_trains_the_adapter_its_micro_batches_train(tiny_model, tmp_path, stage):
    """2 x 2 packed SFT rows or 2 x 3 DPO pairs per step, against the whole step in one micro-batch: the same adapter
    within fp32 rounding (SFT's loss is normalised over the step's tokens, DPO's micro-batches are equal-sized)."""
    split = _run(tiny_model, tmp_path, "split", stage, JOB_TRAIN__MERGE_MICRO_BATCHES="false", **FP32)
    merged = _run(tiny_model, tmp_path, "merged", stage, JOB_TRAIN__MERGE_MICRO_BATCHES="true", **FP32)
    per_step = 2 if stage == "sft" else 3
    ms, mm = (json.loads((d / "metrics.json").read_text()) for d in (split, merged))
    assert ms["micro_batch"] == {"rows": 2, "per_step": per_step}
    assert mm["micro_batch"] == {"rows": 2 * per_step, "per_step": 1}
    assert ms["steps"] == mm["steps"] == 2
    if stage == "sft":
        assert ms["tokens"] == mm["tokens"] > 0  # the same rows
    else:
        assert ms["session"]["pairs"] == mm["session"]["pairs"] == 12
        assert mm["reward_accuracy"] == pytest.approx(ms["reward_accuracy"], abs=1e-6)
    assert mm["train_loss"] == pytest.approx(ms["train_loss"], rel=1e-4)
    assert _max_difference(_adapter(split), _adapter(merged)) <= 1e-7  # the weights are ~1e-2


def test_the_comparison_above_sees_a_step_that_weighs_its_rows_differently(tiny_model, tmp_path, monkeypatch):
    """The control: with each micro-batch's loss averaged on its own (transformers' behaviour without
    `num_items_in_batch`), the split run's adapter is no longer the merged one's: the tolerance above would catch
    a merge that changed what a step computes."""
    from transformers import Trainer

    merged = _run(tiny_model, tmp_path, "merged", JOB_TRAIN__MERGE_MICRO_BATCHES="true", **FP32)
    real = Trainer.get_batch_samples

    def without_step_count(self, *a, **kw):
        batches, _ = real(self, *a, **kw)
        return batches, None

    monkeypatch.setattr(Trainer, "get_batch_samples", without_step_count)
    split = _run(tiny_model, tmp_path, "per-micro-batch-mean", JOB_TRAIN__MERGE_MICRO_BATCHES="false", **FP32)
    assert _max_difference(_adapter(split), _adapter(merged)) > 1e-4


def test_a_merged_micro_batch_keeps_the_rows_per_step():
    from job.settings import load_settings
    from job.trainargs import Runtime, build

    s = load_settings({"JOB_STAGE": "sft", **SETTINGS})
    args = build(s, Runtime(micro_batch=8))
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, 2)  # 16 rows per step, as set
    with pytest.raises(ValueError, match="does not divide"):
        build(s, Runtime(micro_batch=3))


def test_out_of_memory_gives_the_merged_micro_batch_back_first(tiny_model, tmp_path, monkeypatch, caplog):
    """`auto` merged the step into one micro-batch; the GPU said otherwise: the run starts again with the micro-batch
    as set and succeeds, saying so. Merging the user asked for is not given back: exit 5 names the setting."""
    import torch
    from trl import SFTTrainer

    from job.errors import OutOfMemory

    plan_as_on_a_big_gpu(monkeypatch, merge=True)  # what `auto` decides on a big GPU: the whole step in one micro-batch
    real_step = SFTTrainer.training_step
    seen = []

    def step(self, *a, **kw):  # fits only at 2 rows
        seen.append(self.args.per_device_train_batch_size)
        if self.args.per_device_train_batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(SFTTrainer, "training_step", step)
    out = _run(tiny_model, tmp_path, "auto")
    assert (out / "_SUCCESS").exists() and seen[:2] == [4, 2]
    assert any("starting again with 2 rows, as set" in r.getMessage() for r in caplog.records)
    assert json.loads((out / "metrics.json").read_text())["micro_batch"] == {"rows": 2, "per_step": 2}

    with pytest.raises(OutOfMemory) as e:
        _run(tiny_model, tmp_path, "asked", JOB_TRAIN__MERGE_MICRO_BATCHES="true", JOB_TRAIN__GRADIENT_CHECKPOINTING="true",
             JOB_QUANT__KEEP_DEQUANTIZED="false")
    assert "JOB_TRAIN__MERGE_MICRO_BATCHES=false" in str(e.value) and "4 rows" in str(e.value)
    assert not (tmp_path / "out" / "asked" / "_SUCCESS").exists()


def _choose(rank: int, init: str, chosen: list, out):
    import torch.distributed as dist

    from job.memplan import MemoryPlan, same_on_every_process

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        for plans in chosen:
            out.put((rank, same_on_every_process(MemoryPlan(*plans[rank]))))
    finally:
        dist.destroy_process_group()


def test_processes_with_different_free_memory_agree_on_one_memory_plan(tmp_path):
    """Two GPUs with different free memory may choose differently; processes accumulating over different numbers of
    micro-batches would hang at the gradient all-reduce, and checkpointing or the dequantized copy on one rank only
    would run the other out of memory. Every process takes the most careful choice of each: checkpointing if any
    chose it, the copy only if all did, the smallest micro-batch, the offload if any chose it."""
    import torch.multiprocessing as mp

    from job.memplan import MemoryPlan

    chosen = [[(False, True, 16), (False, True, 8)],  # (checkpointing, dequantized copy, micro-batch rows, offload) per rank
              [(False, True, 16), (True, False, 4)],
              [(False, False, 8), (False, True, 8)],
              [(True, False, 16, True), (True, False, 8, False)]]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_choose, args=(rank, f"file://{tmp_path / 'store'}", chosen, out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=120) for _ in range(2 * len(chosen))]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    agreed = [MemoryPlan(False, True, 8), MemoryPlan(True, False, 4), MemoryPlan(False, False, 8), MemoryPlan(True, False, 8, True)]
    for rank in (0, 1):
        assert [plan for r, plan in results if r == rank] == agreed


def test_a_run_stopped_with_merged_steps_resumes_with_split_ones_and_trains_the_same_adapter(tiny_model, tmp_path):
    """A spot reclaim moves the run to a smaller GPU: the first attempt merged each step into one micro-batch, the next
    one splits it as set. The identity does not change, the second attempt resumes from the first one's checkpoint,
    and the adapter is the one an uninterrupted run trains. (Unpacked: 24 examples make 6 steps of 4, so a resume
    that skipped the wrong examples would train on other ones; packed, the demo data fits in a few rows.)"""
    from job import pipeline
    from job.checkpoints import StopSignal
    from job.errors import Preempted

    class ReclaimedAfterStepOne(StopSignal):
        def agree(self, device):  # checked after each optimizer step: as if the signal came during step 1
            self.received = "SIGTERM"
            return self.received

    unpacked = {"JOB_TRAIN__PACKING": "false", "JOB_TRAIN__MAX_STEPS": "3", **FP32}
    whole = _run(tiny_model, tmp_path, "whole", JOB_TRAIN__MERGE_MICRO_BATCHES="false", **unpacked)

    real_run = pipeline.run
    try:
        pipeline.run = lambda s, **kw: real_run(s, stop=ReclaimedAfterStepOne())
        with pytest.raises(Preempted):
            _run(tiny_model, tmp_path, "spot", JOB_TRAIN__MERGE_MICRO_BATCHES="true", **unpacked)
    finally:
        pipeline.run = real_run
    assert (tmp_path / "out" / "spot" / "checkpoints" / "checkpoint-1" / "_COMPLETE").exists()
    assert not (tmp_path / "out" / "spot" / "_SUCCESS").exists()
    # The next pod: same run id, another GPU, the step split as set; a fresh work directory.
    spot = _run(tiny_model, tmp_path, "spot", JOB_TRAIN__MERGE_MICRO_BATCHES="false",
                JOB_WORKDIR=str(tmp_path / "w" / "spot-2"), **unpacked)
    run = json.loads((spot / "run.json").read_text())
    metrics = json.loads((spot / "metrics.json").read_text())
    assert run["resumed_from"] == "checkpoint-1" and metrics["session"]["steps"] == 2
    assert metrics["micro_batch"] == {"rows": 2, "per_step": 2}
    assert metrics["tokens"] == json.loads((whole / "metrics.json").read_text())["tokens"]
    assert _max_difference(_adapter(whole), _adapter(spot)) <= 1e-7


def test_with_several_processes_running_out_of_memory_exits_75_and_the_retry_starts_with_the_choice(tmp_path, monkeypatch):
    import torch

    """The retry after running out of GPU memory ran in the one process that ran out: it reloaded and entered
    collectives the others were not in, and the group hung until the NCCL timeout. With several processes it records
    the choice it gives up and exits 75 (retryable); the retried pod group starts with that choice."""
    from types import SimpleNamespace

    from job import pipeline, storage
    from job.errors import TransientError
    from job.settings import load_settings

    s = load_settings({"JOB_STAGE": "sft", "JOB_BASE_MODEL": "/m", "JOB_DATA": "/d", "JOB_OUTPUT": str(tmp_path / "out"),
                       "JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": "2", "JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS": "2"})
    plan = SimpleNamespace(remote=storage.parse_uri(str(tmp_path / "out")).join("r"), workdir=tmp_path / "w")
    plan.workdir.mkdir()
    monkeypatch.setattr(pipeline, "_distributed_state", lambda: SimpleNamespace(num_processes=2))
    seen, attempts = [], [1]

    def out_of_memory(s, plan, base_dir, stop, progress_bar, *, forced, used):
        seen.append(dict(forced))
        if len(seen) > attempts[0]:
            raise AssertionError("started again inside the process that ran out of memory")
        used.update(checkpointing=False, dequantized=forced["keep_dequantized"] is not False,
                    micro_batch=forced["micro_batch_rows"] or 4)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pipeline, "_train_once", out_of_memory)
    with pytest.raises(TransientError) as e:
        pipeline._train(s, plan, None, None, False)
    assert e.value.exit_code == 75 and "the retried pod group starts with 2 rows, as set" in str(e.value)
    assert len(seen) == 1  # no second attempt inside this process
    attempts[0] = 2
    with pytest.raises(TransientError) as e:  # the retried pod: starts with 2 rows, and gives up the copy next
        pipeline._train(s, plan, None, None, False)
    assert seen[1]["micro_batch_rows"] == 2 and "starts without the copy" in str(e.value)
    assert json.loads((tmp_path / "out" / "r" / "checkpoints" / pipeline.MEMORY_CHOICES).read_text()) == {
        "checkpointing": None, "keep_dequantized": False, "micro_batch_rows": 2, "offload": None}
