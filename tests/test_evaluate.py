"""What a run shows of what it taught (job/evaluate.py): prompts read like data, greedy answers that stop at every EOS id
and don't depend on batching, held-out metrics under stable names, the report files, TensorBoard events and the closing
summary, through `python -m job` as a user runs it."""

from __future__ import annotations

import json
import struct

import pytest

from job.errors import DataError
from job.evaluate import Prompt, eval_metrics, generate, load_prompts, loss_series, markdown, rows
from job.exitcodes import ExitCode
from job.preflight import Inputs
from job.settings import load_settings

from conftest import DEMO_DATA, job_env, run_job

QUESTIONS = ["日本の首都は？", "富士山の高さは何メートルですか？ 一番高い山ですか？", "太陽系で一番大きな惑星は？"]


def settings(tmp_path, **extra):
    return load_settings({"JOB_STAGE": "sft", "JOB_BASE_MODEL": str(tmp_path), "JOB_DATA": str(tmp_path),
                          "JOB_OUTPUT": str(tmp_path / "out"), **extra})


def record(q, a):
    return {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}


# ------------------------------------------------------------------------------------------------------ prompts


def test_settings_default_to_256_new_tokens_and_name_a_bad_value(tmp_path):
    from job.errors import ConfigError

    s = settings(tmp_path)
    assert (s.eval_prompts, s.eval_max_new_tokens) == (None, 256)
    with pytest.raises(ConfigError) as e:
        settings(tmp_path, JOB_EVAL_PROMPTS="gs://bucket/p.jsonl", JOB_EVAL_MAX_NEW_TOKENS="0")
    assert "JOB_EVAL_PROMPTS: 'gs://bucket/p.jsonl': unsupported scheme" in str(e.value)
    assert "JOB_EVAL_MAX_NEW_TOKENS: Input should be greater than 0" in str(e.value)


def test_prompts_from_files_in_every_form_with_their_references(tmp_path):
    inputs = Inputs(train=[], eval=[])
    (tmp_path / "p.txt").write_text("日本の首都は？\n\n  \n富士山の高さは？\n", encoding="utf-8")
    got = load_prompts(settings(tmp_path, JOB_EVAL_PROMPTS=str(tmp_path / "p.txt")), inputs, tmp_path / "w", None)
    assert [(p.text, p.reference) for p in got] == [("日本の首都は？", None), ("富士山の高さは？", None)]
    assert inputs.identity["eval_prompts"]["sha256"]  # recorded in run.json with the other inputs

    (tmp_path / "p.jsonl").write_text('{"prompt": "Q1", "answer": "A1"}\n{"prompt": [{"role": "system", "content": "S"}, '
                                      '{"role": "user", "content": "Q2"}]}\n', encoding="utf-8")
    got = load_prompts(settings(tmp_path, JOB_EVAL_PROMPTS=str(tmp_path / "p.jsonl")), inputs, tmp_path / "w", None)
    assert [(p.text, p.reference, len(p.messages)) for p in got] == [("Q1", "A1", 1), ("Q2", None, 2)]

    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\nQ1,good,bad\n", encoding="utf-8")
    got = load_prompts(settings(tmp_path, JOB_EVAL_PROMPTS=str(tmp_path / "p.csv")), inputs, tmp_path / "w", None)
    assert [(p.text, p.reference) for p in got] == [("Q1", "good")]

    # Any SFT record format (here the seed's text + output): the answers become the references.
    got = load_prompts(settings(tmp_path, JOB_EVAL_PROMPTS=str(DEMO_DATA / "sft.jsonl")), inputs, tmp_path / "w", None)
    first = json.loads((DEMO_DATA / "sft.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert len(got) == 24 and (got[0].text, got[0].reference) == (first["text"], first["output"])


def test_default_prompts_are_the_first_eight_of_the_eval_data_else_of_the_training_data(tmp_path):
    train = [record(f"t{i}", f"a{i}") for i in range(20)]
    held = [record(f"e{i}", f"b{i}") for i in range(3)]
    s = settings(tmp_path)
    assert [p.text for p in load_prompts(s, Inputs(train=train, eval=held), tmp_path, None)] == ["e0", "e1", "e2"]
    got = load_prompts(s, Inputs(train=train, eval=[]), tmp_path, None)
    assert [p.text for p in got] == [f"t{i}" for i in range(8)] and got[0].reference == "a0"
    dpo = [{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "r"}]}]
    assert load_prompts(s, Inputs(train=dpo, eval=[]), tmp_path, None)[0].reference == "c"
    assert load_prompts(settings(tmp_path, JOB_EVAL_PROMPTS="none"), Inputs(train=train, eval=held), tmp_path, None) == []


@pytest.mark.parametrize("content, message", [
    ('{"question": "Q"}\n', "row 1: no recognised columns"),
    ('{"prompt": "Q"}\n{"prompt": ""}\n', "row 2: field 'prompt' must be non-empty text or a list of messages"),
    (b"\x93\xfa\x96\x7b\n", "not valid UTF-8"),
])
def test_a_bad_prompts_file_names_the_variable_file_and_row(tmp_path, content, message):
    path = tmp_path / ("p.txt" if isinstance(content, bytes) else "p.jsonl")
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as e:
        load_prompts(settings(tmp_path, JOB_EVAL_PROMPTS=str(path)), Inputs(train=[], eval=[]), tmp_path / "w", None)
    assert str(e.value).startswith(f"JOB_EVAL_PROMPTS: {path}") and message in str(e.value)


def test_a_bad_prompts_file_fails_with_exit_3_before_the_model_is_loaded(tiny_model, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in tiny_model.iterdir():  # weights that would fail to load (exit 4) if the job got that far
        (model_dir / f.name).write_bytes(b"not weights" if f.suffix == ".safetensors" else f.read_bytes())
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Q"}\n{"prompt": 3}\n', encoding="utf-8")
    r = run_job(job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(model_dir), JOB_DATA=str(DEMO_DATA / "sft.jsonl"),
                        JOB_OUTPUT=str(tmp_path / "out"), JOB_WORKDIR=str(tmp_path / "w"),
                        JOB_EVAL_PROMPTS=str(tmp_path / "prompts.jsonl")))
    assert r.returncode == ExitCode.DATA, r.stderr[-2000:]
    assert f"JOB_EVAL_PROMPTS: {tmp_path / 'prompts.jsonl'}: row 2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------- generating


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    from transformers import AutoModelForCausalLM

    from job.model import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model), load_tokenizer(tiny_model, None, "auto")[0]


def test_answers_stop_at_the_generation_config_eos_ids_and_count_the_eos(model_and_tokenizer):
    import torch

    model, tok = model_and_tokenizer
    prompt = Prompt([{"role": "user", "content": QUESTIONS[0]}])
    free = generate(model, tok, [prompt], max_new_tokens=6, batch_tokens=4096)[0]
    assert free["new_tokens"] == 6 and not free["stopped_at_eos"]  # the control: this random model never says EOS
    ids = torch.tensor([tok.apply_chat_template(prompt.messages, add_generation_prompt=True, return_dict=False)])
    row = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    stop = row.index(row[2])  # make the third answer token an end-of-answer id, as a chat model's end-of-turn is
    assert tok.decode(row, skip_special_tokens=True) == free["text"]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, row[2]]
    try:
        got = generate(model, tok, [prompt], max_new_tokens=6, batch_tokens=4096)[0]
    finally:
        model.generation_config.eos_token_id = saved
    assert got["stopped_at_eos"] and got["new_tokens"] == stop + 1  # the EOS counts as generated
    assert got["text"] == tok.decode(row[:stop], skip_special_tokens=True)  # and is not part of the answer


def test_batched_answers_equal_one_at_a_time(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [Prompt([{"role": "user", "content": q}]) for q in QUESTIONS]  # different lengths: left padding
    batched = generate(model, tok, prompts, max_new_tokens=8, batch_tokens=4096)
    single = generate(model, tok, prompts, max_new_tokens=8, batch_tokens=1)  # one prompt per call
    assert [g["text"] for g in batched] == [g["text"] for g in single]
    assert len({g["prompt_tokens"] for g in batched}) == 3


def test_generation_stops_when_its_time_budget_is_spent(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    prompts = [Prompt([{"role": "user", "content": q}], reference="x") for q in QUESTIONS]
    gens = generate(model, tok, prompts, max_new_tokens=8, batch_tokens=4096, time_budget_s=0)
    assert [g["text"] for g in gens] == [None] * 3
    table = rows(prompts, gens, gens)
    assert table[0]["after"] is None and table[0]["after_exact_match"] is False
    assert markdown(table, settings(tmp_path)).count("not generated: time budget spent") == 6


# ------------------------------------------------------------------------------------------- metrics and report


def test_held_out_metrics_of_both_stages_reach_metrics_json_names(tiny_model, tmp_path):
    from datasets import Dataset

    from job.model import load_base_model, load_tokenizer
    from job.stages import dpo, sft

    tok, _ = load_tokenizer(tiny_model, None, "auto")
    common = {"JOB_BASE_MODEL": str(tiny_model), "JOB_WORKDIR": str(tmp_path / "w"), "JOB_TRAIN__SAVE_STEPS": "0"}
    s = settings(tmp_path, **common)
    data = Dataset.from_list([record(q, "東京です。") for q in QUESTIONS])
    trainer = sft.build_trainer(s, load_base_model(tiny_model, s), tok, data, data, tmp_path / "ck", [], progress_bar=False)
    got = eval_metrics("sft", trainer.evaluate())
    assert set(got) == {"eval_loss", "eval_mean_token_accuracy"} and got["eval_loss"] > 0
    assert 0 <= got["eval_mean_token_accuracy"] <= 1

    s = settings(tmp_path, JOB_STAGE="dpo", **common)
    pairs = Dataset.from_list([{**record(q, "東京です。"), "chosen": record(q, "東京です。")["completion"],
                                "rejected": [{"role": "assistant", "content": "大阪です。"}]} for q in QUESTIONS]
                              ).remove_columns("completion")
    trainer = dpo.build_trainer(s, load_base_model(tiny_model, s), tok, pairs, pairs, tmp_path / "ck2", [], progress_bar=False)
    got = eval_metrics("dpo", trainer.evaluate())
    assert set(got) == {"eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_reward_chosen",
                        "eval_reward_rejected", "eval_logps_chosen", "eval_logps_rejected"}
    assert None not in got.values(), got  # every name still matches what TRL reports
    assert got["eval_logps_chosen"] < 0 and got["eval_logps_rejected"] < 0 and 0 <= got["eval_reward_accuracy"] <= 1
    assert eval_metrics("dpo", None) == {}


def test_summary_without_generations_names_steps_losses_and_outputs(tmp_path):
    from job.evaluate import summary

    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"stage": "sft", "steps": 7, "eval_loss": 1.25, "train_runtime_s": 3.0}))
    history = [{"step": 1, "loss": 2.5}, {"step": 5, "loss": 1.5}, {"step": 7, "eval_loss": 1.25}]
    text = summary(out, "s3://b/runs/r1", history)
    assert "qlora-job sft finished: s3://b/runs/r1" in text and "7 steps, train loss 2.5 -> 1.5, eval loss 1.25" in text
    assert "outputs: adapter/, metrics.json, _SUCCESS" in text and "prompt:" not in text


def test_the_final_evaluation_does_not_truncate_the_training_event_file(tmp_path, monkeypatch):
    """A run whose training and final evaluate() fall within one second (tensorboardX names event files by the second):
    the training's scalars are still in the copied event files. Fails without keep_one_tensorboard_writer: the final
    evaluate()'s writer reopens the same file name and truncates it."""
    import time
    from types import SimpleNamespace

    from transformers.integrations import TensorBoardCallback

    from job import evaluate, outputs

    monkeypatch.setattr(time, "time", lambda: 1796366555.25)  # every writer opens in the same second
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[TensorBoardCallback()]))
    outputs.keep_one_tensorboard_writer(trainer)
    [cb] = trainer.callback_handler.callbacks
    args = SimpleNamespace(output_dir=str(tmp_path / "checkpoints"), to_json_string=lambda: "{}")
    state = SimpleNamespace(is_world_process_zero=True, is_hyper_param_search=False, global_step=1)
    cb.on_train_begin(args, state, None)  # what the Trainer calls, in its order
    cb.on_log(args, state, None, logs={"loss": 1.5})
    state.global_step = 2
    cb.on_log(args, state, None, logs={"eval_loss": 1.25})
    cb.on_train_end(args, state, None)
    cb.on_log(args, state, None, logs={"eval_loss": 1.0})  # the final evaluate(), after training
    evaluate._copy_tensorboard(trainer, tmp_path / "tensorboard")
    tb = _tb_scalars(tmp_path / "tensorboard")
    assert tb.get("train/loss") == [(1, 1.5)] and tb.get("eval/loss") == [(2, 1.25), (2, 1.0)], tb


def _tb_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Scalars in TensorBoard event files (TFRecord framing: length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        raw = path.read_bytes()
        i = 0
        while i < len(raw):
            (n,) = struct.unpack("<Q", raw[i:i + 8])
            event = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _png_size(path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", raw[16:24])


def test_sft_then_dpo_runs_report_generations_metrics_plot_tensorboard_and_a_summary(tiny_model, tmp_path):
    common = dict(JOB_BASE_MODEL=str(tiny_model), JOB_OUTPUT=str(tmp_path / "runs"), JOB_WORKDIR=str(tmp_path / "w"),
                  JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="2", JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1",
                  JOB_TRAIN__LOGGING_STEPS="2", JOB_TRAIN__SAVE_STEPS="0", JOB_TRAIN__MAX_LENGTH="128",
                  JOB_TRAIN__LEARNING_RATE="5e-3", JOB_EVAL_FRACTION="0.25", JOB_EVAL_MAX_NEW_TOKENS="12")
    r = run_job(job_env(**common, JOB_STAGE="sft", JOB_DATA=str(DEMO_DATA / "sft.jsonl"), JOB_RUN_ID="sft",
                        JOB_TRAIN__MAX_STEPS="5", JOB_TRAIN__EVAL_STEPS="2", JOB_TRAIN__REPORT_TO="tensorboard"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "sft"
    table = [json.loads(line) for line in (out / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(table) == 6  # the eval split (25% of 24 records), fewer than the default 8
    for row in table:
        assert row["reference"] and row["before"] is not None and row["after"] is not None
        assert 1 <= row["before_new_tokens"] <= 12 and 1 <= row["after_new_tokens"] <= 12 and row["prompt_tokens"] > 5
    md = (out / "generations.md").read_text(encoding="utf-8")
    assert all(f"> {row['prompt']}" in md for row in table) and md.count("| before (") == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0 and 0 <= metrics["eval_mean_token_accuracy"] <= 1
    assert metrics["generation_prompts"] == 6 and metrics["generation_exact_match_before"] == 0.0
    assert _png_size(out / "loss.png")[0] < 1000  # one panel: loss

    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    series = loss_series(history, "sft")
    assert series["eval loss"][0] == [2, 4, 5]  # every eval, and the final one, once per step
    assert series["train loss"][0][0] == 1 and series["train loss"][0][-1] >= 4
    tb = _tb_scalars(out / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == series["train loss"][0]
    # Every evaluation logged, the final evaluate() after training included (queued events are written before upload).
    assert [s for s, _ in tb["eval/loss"]] == [h["step"] for h in history if "eval_loss" in h]

    assert f"qlora-job sft finished: {out}" in r.stdout and "5 steps, train loss" in r.stdout
    assert "generations.md" in r.stdout and "loss.png" in r.stdout
    assert f"prompt: {table[0]['prompt']!r}" in r.stdout and "before:" in r.stdout and "after:" in r.stdout
    # The next step, with this run's adapter, and how to load it.
    assert f"JOB_STAGE=dpo JOB_BASE_MODEL={tiny_model} JOB_ADAPTER={out / 'adapter'} JOB_OUTPUT={tmp_path / 'runs'} " \
           "JOB_DATA=<your pairs> qlora-job" in r.stdout, r.stdout
    assert f"model = PeftModel.from_pretrained(base, '{out / 'adapter'}')" in r.stdout
    assert_no_noise(r.stderr)

    # DPO on that adapter, with held-out pairs: reward metrics, and a plot with reward accuracy and margin.
    r = run_job(job_env(**common, JOB_STAGE="dpo", JOB_DATA=str(DEMO_DATA / "dpo.csv"), JOB_RUN_ID="dpo",
                        JOB_ADAPTER=str(out / "adapter"), JOB_TRAIN__MAX_STEPS="3"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "dpo"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("eval_reward_accuracy", "eval_reward_margin", "eval_logps_chosen", "eval_logps_rejected"):
        assert metrics[key] is not None, key
    assert _png_size(out / "loss.png")[0] > 1500  # three panels: loss, reward accuracy, reward margin
    assert (out / "generations.md").exists() and metrics["generation_prompts"] >= 1
    assert "eval reward accuracy" in r.stdout and not (out / "tensorboard").exists()
    assert f"JOB_STAGE=merge JOB_BASE_MODEL={tiny_model} JOB_ADAPTER={out / 'adapter'} JOB_OUTPUT={tmp_path / 'runs'} qlora-job" in r.stdout
    assert_no_noise(r.stderr)


#: Library output that alarms without telling a user of this job anything (job/logs.py's NOISE): bitsandbytes' missing
#: optional CPU kernel (logged at its import on AVX512-BF16 CPUs, such as the development machine), and any hint at
#: the trust_remote_code security switch.
NOISE = ("gemm_4bit_forward", "pip install kernels", "trust_remote_code", "silently incorrect")


def assert_no_noise(stderr: str) -> None:
    found = [n for n in NOISE if n in stderr]
    assert not found, [line for line in stderr.splitlines() if any(n in line for n in found)][:5]


def test_the_loss_plot_labels_a_flat_loss_with_its_values_not_an_offset():
    """A loss flat to 1e-6 (a converged or frozen run): with matplotlib's default offset notation the axis reads
    0..4 "+6.931e-1" and the line looks like a steep fall; without it the labels are the values."""
    from job.evaluate import loss_figure

    history = [{"step": i, "loss": 0.6931470 + i * 1e-7} for i in range(1, 11)]
    fig = loss_figure(history, "sft")
    fig.canvas.draw()  # tick labels and the offset text are decided when drawing
    [ax] = fig.axes
    fmt = ax.yaxis.get_major_formatter()
    assert fmt.get_offset() == ""
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(label.startswith("0.69314") for label in labels), labels
