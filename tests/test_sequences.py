"""The length policy and the EOS check (job/sequences.py): every trained sequence ends with its answer's EOS, fits
JOB_TRAIN__MAX_LENGTH, and what was cut or dropped is reported. In process for the cases, then through `python -m job`
for what a user sees: exit codes, messages, metrics.json and --check."""

import json

import pytest

from job.errors import ConfigError, DataError
from job.exitcodes import ExitCode
from job.model import load_tokenizer
from job.sequences import fit, stop_ids

from conftest import job_env, run_job

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def user(t):
    return [{"role": "user", "content": t}]


def assistant(t):
    return [{"role": "assistant", "content": t}]


def sft_records(*pairs):
    return [{"prompt": user(p), "completion": assistant(a), "source": f"d.jsonl: row {i + 1}"} for i, (p, a) in enumerate(pairs)]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model, None, "auto")[0]


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


LONG_PROMPT = "日本の首都はどこですか？" * 12
ANSWER = "東京です。"


def test_fitting_examples_are_untouched_and_end_with_eos(tok):
    f = fit(sft_records(("日本の首都は？", ANSWER)), "sft", tok, max_length=128, policy="cut_prompt", stops={tok.eos_token_id}, role="train")
    row = f.rows[0]
    trained = [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]
    assert trained[-1] == tok.eos_token_id and tok.decode(trained[:-1]) == ANSWER
    assert tok.decode(row["input_ids"][: row["completion_mask"].index(1)]) == "<s>### 指示\n日本の首都は？\n### 回答\n"
    assert f.report["prompt_cut"] == f.report["dropped"] == 0 and f.report["kept"] == 1


def test_cut_prompt_keeps_bos_and_the_whole_answer(tok):
    records = sft_records(("短い質問", ANSWER), (LONG_PROMPT, ANSWER))
    f = fit(records, "sft", tok, max_length=40, policy="cut_prompt", stops={tok.eos_token_id}, role="train")
    assert f.report["kept"] == 2 and f.report["prompt_cut"] == 1 and f.report["first_prompt_cut"] == ["d.jsonl: row 2"]
    row = f.rows[1]
    assert len(row["input_ids"]) == 40 and row["input_ids"][0] == tok.bos_token_id  # BOS kept, the prompt's start cut
    trained = [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]
    assert tok.decode(trained) == ANSWER + "</s>"  # the whole answer and its EOS
    assert tok.decode(row["input_ids"]).endswith("### 回答\n" + ANSWER + "</s>")


def test_drop_policy_and_answers_that_cannot_fit(tok):
    records = sft_records(("短い質問", ANSWER), (LONG_PROMPT, ANSWER), ("質問", "とても長い回答です。" * 10))
    f = fit(records, "sft", tok, max_length=40, policy="drop", stops={tok.eos_token_id}, role="train")
    assert f.report["kept"] == 1 and f.report["dropped"] == 2 and f.report["first_dropped"] == ["d.jsonl: row 2", "d.jsonl: row 3"]
    f = fit(records, "sft", tok, max_length=40, policy="cut_prompt", stops={tok.eos_token_id}, role="train")
    assert f.report["kept"] == 2 and f.report["dropped"] == 1 and f.report["first_dropped"] == ["d.jsonl: row 3"]
    assert all(len(r["input_ids"]) <= 40 for r in f.rows)


def test_nothing_left_is_a_data_error_naming_max_length(tok):
    with pytest.raises(DataError, match="JOB_TRAIN__MAX_LENGTH=4"):
        fit(sft_records((LONG_PROMPT, ANSWER)), "sft", tok, max_length=4, policy="cut_prompt", stops={tok.eos_token_id}, role="train")


def test_a_cut_that_leaves_no_prompt_text_drops_the_example(tok):
    """Cutting from the start must leave the template's end (`\n### 回答\n`) whole and some of the prompt's text
    before it; a cut down to `<s>` and part of the template trained an answer to nothing (issue 25)."""
    records = sft_records((LONG_PROMPT, ANSWER))
    answer = n_tokens(tok, ANSWER) + 1  # and its EOS
    tail = n_tokens(tok, "\n### 回答\n")
    for max_length in range(answer + 1, answer + 1 + tail + 1):  # BOS plus at most the template's end
        with pytest.raises(DataError, match=f"JOB_TRAIN__MAX_LENGTH={max_length}"):
            fit(records, "sft", tok, max_length=max_length, policy="cut_prompt", stops={tok.eos_token_id}, role="train")
    f = fit(records, "sft", tok, max_length=answer + 1 + tail + 6, policy="cut_prompt", stops={tok.eos_token_id}, role="train")
    row = f.rows[0]
    prompt = tok.decode(row["input_ids"][: row["completion_mask"].index(1)])
    assert f.report["prompt_cut"] == 1 and prompt.startswith("<s>") and prompt.endswith("ですか？\n### 回答\n"), prompt


def test_more_than_the_allowed_share_cut_or_dropped_fails_naming_the_lengths_that_fit(tok):
    records = sft_records(*[("短い質問", ANSWER)] * 8, (LONG_PROMPT, ANSWER), ("質問", "とても長い回答です。" * 10))
    whole = [n_tokens(tok, f"### 指示\n{p}\n### 回答\n{a}") + 2 for p, a in [(LONG_PROMPT, ANSWER), ("質問", "とても長い回答です。" * 10)]]
    kw = dict(max_length=40, policy="cut_prompt", stops={tok.eos_token_id}, role="train")
    with pytest.raises(DataError) as e:
        fit(records, "sft", tok, max_share=0.1, **kw)
    msg = str(e.value)
    assert "2 of 10 examples (20%) are longer than JOB_TRAIN__MAX_LENGTH=40: 1 would have their prompt cut, 1 be dropped" in msg
    assert "JOB_MAX_OVER_LENGTH_SHARE=0.1" in msg and "d.jsonl: row 9, d.jsonl: row 10" in msg
    assert f"{max(whole)} all of them" in msg
    f = fit(records, "sft", tok, max_share=0.2, **kw)  # at the limit: kept, and reported
    assert (f.report["prompt_cut"], f.report["dropped"], f.report["whole_max"]) == (1, 1, max(whole))


def test_dpo_keeps_both_answers_whole_and_cuts_the_prompt(tok):
    pair = {"prompt": user(LONG_PROMPT), "chosen": assistant(ANSWER), "rejected": assistant("大阪だと思います。"), "source": "p.csv: row 1"}
    f = fit([pair], "dpo", tok, max_length=40, policy="cut_prompt", stops={tok.eos_token_id}, role="train")
    row = f.rows[0]
    assert tok.decode(row["chosen_ids"]) == ANSWER + "</s>" and tok.decode(row["rejected_ids"]) == "大阪だと思います。</s>"
    assert row["prompt_ids"][0] == tok.bos_token_id
    assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) == 40
    assert f.report["prompt_cut"] == 1
    long_answer = {**pair, "rejected": assistant("とても長い回答です。" * 10)}
    assert fit([pair, long_answer], "dpo", tok, max_length=40, policy="cut_prompt", stops={tok.eos_token_id}, role="train").report["dropped"] == 1


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory):
    from conftest import DEMO_DATA
    from job.demo import build_tiny_model, demo_texts

    return build_tiny_model(tmp_path_factory.mktemp("chatml") / "model", demo_texts(DEMO_DATA),
                            extra_specials=["<|im_start|>", "<|im_end|>"], chat_template=CHATML)


def test_an_end_of_turn_token_that_is_not_eos_is_refused_then_trained_when_named(chatml_model):
    tok, fmt = load_tokenizer(chatml_model, None, "auto")
    assert fmt == "chat_template"
    records = sft_records(("日本の首都は？", ANSWER))
    stops = stop_ids(tok, chatml_model)
    assert stops == {tok.convert_tokens_to_ids("</s>")}  # what generate() would stop on
    with pytest.raises(ConfigError, match=r"JOB_TRAIN__EOS_TOKEN=<\|im_end\|>"):
        fit(records, "sft", tok, max_length=64, policy="cut_prompt", stops=stops, role="train")

    tok, _ = load_tokenizer(chatml_model, None, "auto", eos_token="<|im_end|>")
    f = fit(records, "sft", tok, max_length=64, policy="cut_prompt", stops=stop_ids(tok, chatml_model), role="train")
    row = f.rows[0]
    trained = [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]
    # The trained part ends on <|im_end|> (now the EOS); the template's newline after it is not trained.
    assert tok.convert_ids_to_tokens(trained[-1]) == "<|im_end|>" and tok.decode(trained[:-1]) == ANSWER
    assert row["input_ids"][-1] == trained[-1]


def test_eos_check_and_length_policy_through_the_cli(chatml_model, tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": p, "output": a}, ensure_ascii=False)
                              for p, a in [(LONG_PROMPT, ANSWER), ("質問", ANSWER)]) + "\n", encoding="utf-8")
    env = job_env(JOB_STAGE="sft", JOB_DATA=str(data), JOB_OUTPUT=str(tmp_path / "out"), JOB_WORKDIR=str(tmp_path / "w"),
                  JOB_TRAIN__MAX_LENGTH="40", JOB_MAX_OVER_LENGTH_SHARE="1")
    r = run_job({**env, "JOB_BASE_MODEL": str(chatml_model)}, "--check")
    assert r.returncode == ExitCode.CONFIG and "JOB_TRAIN__EOS_TOKEN=<|im_end|>" in r.stderr and "Traceback" not in r.stderr
    r = run_job({**env, "JOB_BASE_MODEL": str(chatml_model), "JOB_TRAIN__EOS_TOKEN": "<|im_end|>"}, "--check")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["eos"] == ["<|im_end|>", "</s>"] or report["eos"] == sorted(["<|im_end|>", "</s>"])
    assert report["example"]["trained"].endswith("<|im_end|>")

    r = run_job({**env, "JOB_BASE_MODEL": str(tiny_model)}, "--check")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["train"]["prompt_cut"] == 1 and report["train"]["first_prompt_cut"] == [f"{data}: row 1"]
    assert f"{data}: row 1" in r.stderr  # the log names it too


@pytest.mark.parametrize("packing", ["true", "false"])
def test_a_run_with_nothing_trainable_fails_with_exit_3(tiny_model, tmp_path, packing):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "質問", "output": "とても長い回答です。" * 10}, ensure_ascii=False) + "\n", encoding="utf-8")
    r = run_job(job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(tiny_model), JOB_DATA=str(data), JOB_OUTPUT=str(tmp_path / "out"),
                        JOB_WORKDIR=str(tmp_path / "w"), JOB_RUN_ID="r", JOB_TRAIN__MAX_LENGTH="16", JOB_TRAIN__PACKING=packing))
    assert r.returncode == ExitCode.DATA, r.stderr[-2000:]
    assert "JOB_TRAIN__MAX_LENGTH=16" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "r" / "_SUCCESS").exists() and not (tmp_path / "w" / "r" / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("template", ["instruction", "chatml"])
def test_batched_tokenization_equals_one_call_per_example(tok, chatml_model, template):
    """fit() tokenizes all examples in one batched call; each sequence must be what one call per example gives (TRL's
    own tokenization), for both prompt formats, SFT and DPO."""
    from conftest import DEMO_DATA
    from job import sequences
    from job.data import load_records
    from job.settings import ColumnSettings

    t = tok if template == "instruction" else load_tokenizer(chatml_model, None, "auto", eos_token="<|im_end|>")[0]
    qa = load_records(DEMO_DATA / "sft.jsonl", "sft.jsonl", "sft", ColumnSettings())
    pairs = load_records(DEMO_DATA / "dpo.csv", "dpo.csv", "dpo", ColumnSettings())
    conversations = [r["prompt"] + r["completion"] for r in qa] + [r["prompt"] + r["chosen"] for r in pairs]
    conversations += [r["prompt"] for r in pairs]
    for generation_prompt in (True, False):
        convs = [c for c in conversations if (c[-1]["role"] == "user") == generation_prompt]
        one_by_one = [list(t.apply_chat_template(c, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False))
                      for c in convs]
        assert sequences._ids(t, convs, generation_prompt=generation_prompt) == one_by_one
        assert len(set(map(len, one_by_one))) > 1  # conversations of different lengths: no padding crept in
