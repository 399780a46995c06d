import json
import re
import subprocess
import sys
from pathlib import Path

from job.exitcodes import PERMANENT, RETRYABLE, ExitCode

from conftest import DEMO_DATA, imported_modules, job_env, run_job

ROOT = Path(__file__).resolve().parents[1]
IMPORTTIME = ("-X", "importtime")  # the modules a run imports, on stderr (conftest.imported_modules)
TRAINING_STACK = {"torch", "transformers", "trl", "datasets", "peft", "bitsandbytes", "accelerate"}


def test_readme_exit_code_table_matches_the_code():
    rows = dict(re.findall(r"^\| (\d+) \| (\w+) \|", (ROOT / "README.md").read_text(encoding="utf-8"), re.M))
    assert {int(k): v for k, v in rows.items()} == {c.value: c.name.lower() for c in ExitCode}
    assert not PERMANENT & RETRYABLE and ExitCode.OK not in PERMANENT | RETRYABLE


def test_check_reports_stats_without_loading_the_model(tiny_model, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in tiny_model.iterdir():  # a model directory whose weights would fail to load: --check must not touch them
        (model_dir / f.name).write_bytes(b"not weights" if f.suffix == ".safetensors" else f.read_bytes())
    r = run_job(job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(model_dir), JOB_DATA=str(DEMO_DATA / "sft.jsonl"),
                        JOB_OUTPUT=str(tmp_path / "out"), JOB_WORKDIR=str(tmp_path / "w"), JOB_TRAIN__MAX_LENGTH="40",
                        JOB_MAX_OVER_LENGTH_SHARE="1"), "--check")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["train"]["records"] == 24 and report["prompt_format"] == "instruction"
    assert 0 < report["train"]["tokens_p50"] <= report["train"]["tokens_max"] <= 40
    assert report["train"]["prompt_cut"] > 0 and "longer than JOB_TRAIN__MAX_LENGTH=40" in r.stderr
    [read] = report["files"]
    assert (read["role"], read["file"], read["format"], read["records"]) == ("train", str(DEMO_DATA / "sft.jsonl"), "text_output", 24)
    assert report["example"]["prompt"].startswith("<s>### 指示\n") and report["example"]["trained"].endswith("</s>")
    assert report["plan"]["steps"] > 0 and report["run"] == "a new run"
    assert report["fast_paths"]["packed_attention"] == {"on": True, "why": "packed rows through one causal SDPA per example (CPU)"}
    assert not (tmp_path / "out").exists()  # the write probe leaves nothing behind


def test_check_fails_on_bad_data_with_exit_3(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "Q", "output": ""}\n', encoding="utf-8")
    r = run_job(job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(tmp_path), JOB_DATA=str(tmp_path / "d.jsonl"),
                        JOB_OUTPUT=str(tmp_path / "out")), "--check")
    assert r.returncode == ExitCode.DATA and "d.jsonl: row 1: field 'output' is empty" in r.stderr


def test_unknown_command_is_a_usage_error():
    assert run_job(job_env(), "train").returncode == ExitCode.CONFIG


def test_a_sigterm_while_an_error_is_reported_or_the_process_exits_changes_nothing(tmp_path):
    """torchrun sends SIGTERM to every other process as soon as one fails; one that is already reporting its own
    error, or exiting, keeps its exit code and prints no traceback. Here the signal arrives twice: while the error
    is logged and while the process exits (a temporary directory's cleanup); then once more while a process that
    succeeded exits."""
    script = (
        "import atexit, logging, os, signal\n"
        "import job.__main__ as m\n"
        "class Kill(logging.Filter):\n"
        "    def filter(self, record):\n"
        "        if record.levelno >= logging.ERROR: os.kill(os.getpid(), signal.SIGTERM)\n"
        "        return True\n"
        "logging.getLogger('job').addFilter(Kill())\n"
        "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
        "m.cli()\n"
    )
    env = job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(tmp_path), JOB_DATA=str(tmp_path / "missing.jsonl"),
                  JOB_OUTPUT=str(tmp_path / "out"), JOB_TRAIN__LEARNING_RATE="fast")
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == ExitCode.CONFIG, r.stderr[-2000:]
    assert "JOB_TRAIN__LEARNING_RATE" in r.stderr and "Traceback" not in r.stderr and "Preempted" not in r.stderr, r.stderr[-2000:]
    # A process that succeeded (here --print-config), signalled while it exits: still exit 0, no traceback.
    del env["JOB_TRAIN__LEARNING_RATE"]
    r = subprocess.run([sys.executable, "-c", script, "--print-config"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == ExitCode.OK and "Traceback" not in r.stderr and "Preempted" not in r.stderr, r.stderr[-2000:]
    assert json.loads(r.stdout)["stage"] == "sft"


def test_the_readme_installs_the_tested_versions_for_the_demo_and_the_tests():
    """`pip install .` alone takes the newest releases (transformers 5.25 and accelerate 1.16 once they were out, against
    the tested 5.24 and 1.15): both of the README's install commands pin the lock's versions."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    installs = re.findall(r"^python3 -m venv \.venv && (.*)$", readme, re.M)
    assert any("qlora-job demo" in line for line in installs) and len(installs) >= 2, installs
    for line in installs:
        assert re.search(r"pip install [^&]* -c docker/constraints\.txt", line), line


def test_the_noise_filters_drop_their_messages_and_nothing_else(caplog):
    """job/logs.py's NOISE, record by record: each message is dropped where its library logs it, other messages of the
    same logger are kept. (The bitsandbytes one end to end: tests/test_evaluate.py's runs, on an AVX512-BF16 CPU.)"""
    import logging

    from job import logs

    logs.drop_noise()
    logs.drop_noise()  # idempotent: one filter per message
    for name, prefix, _ in logs.NOISE:
        logger = logging.getLogger(name)
        assert sum(isinstance(f, logs._DropNoise) for f in logger.filters) == sum(n == name for n, _, _ in logs.NOISE)
        with caplog.at_level(logging.WARNING, logger=name):
            caplog.clear()
            logger.warning(prefix + "%s", " details: pip install something")
            logger.warning("something a user should read")
        assert [r.getMessage() for r in caplog.records] == ["something a user should read"], name


def test_print_config_answers_without_importing_the_training_stack():
    """--print-config took 13-16 s on 2 cores importing torch, transformers and TRL it doesn't use. The TRL names it
    can't check without them are listed, for --check."""
    env = job_env(JOB_STAGE="sft", JOB_BASE_MODEL="org/model", JOB_DATA="/data/d.jsonl", JOB_OUTPUT="/out",
                  JOB_TRAIN__NEFTUNE_NOISE_ALPHA="5", JOB_LOG_FORMAT="json")
    r = run_job(env, "--print-config", python=IMPORTTIME, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["train"]["neftune_noise_alpha"] == "5"
    imported = imported_modules(r.stderr)
    assert "job.settings" in imported  # the measurement works
    assert not imported & TRAINING_STACK
    assert "JOB_TRAIN__NEFTUNE_NOISE_ALPHA: passed to TRL, not checked here (--check and a run check it)" in r.stderr


def test_settings_storage_and_data_mistakes_are_reported_before_the_training_stack_is_imported(tmp_path):
    """The most common mistakes (a setting, an output or scratch path, a data row) were reported after 10-20 s of
    imports they don't need (torch, transformers, PEFT, TRL): now in well under a second, by a run and by --check
    alike. The control: a JOB_TRAIN__ name only TRL's own config can check is still refused before any download,
    with the stack imported (so the measurement sees it when it is there)."""
    (tmp_path / "bad.jsonl").write_text('{"text": "Q1", "output": "A1"}\n{"text": "Q2"}\n', encoding="utf-8")
    (tmp_path / "a-file").write_text("x")
    base = dict(JOB_STAGE="sft", JOB_BASE_MODEL=str(tmp_path / "no-model"), JOB_DATA=str(DEMO_DATA / "sft.jsonl"),
                JOB_OUTPUT=str(tmp_path / "out"), JOB_WORKDIR=str(tmp_path / "w"), JOB_LOG_FORMAT="json")
    cases = [
        ({"JOB_TRAIN__LEARNING_RATE": "fast"}, ExitCode.CONFIG, "JOB_TRAIN__LEARNING_RATE: Input should be a valid number"),
        ({"JOB_OUTPUT": str(tmp_path / "a-file" / "out")}, ExitCode.CONFIG, "JOB_OUTPUT: "),
        ({"JOB_WORKDIR": str(tmp_path / "a-file" / "w")}, ExitCode.CONFIG, "JOB_WORKDIR: "),
        ({"JOB_DATA": str(tmp_path / "bad.jsonl")}, ExitCode.DATA, "bad.jsonl: row 2: missing field 'output'"),
    ]
    for extra, code, message in cases:
        for args in ((), ("--check",)):
            r = run_job(job_env(**{**base, **extra}), *args, python=IMPORTTIME, timeout=120)
            assert r.returncode == code and message in r.stderr, (extra, args, r.stderr[-2000:])
            imported = imported_modules(r.stderr)
            assert "job.settings" in imported and not imported & TRAINING_STACK, (extra, args, imported & TRAINING_STACK)
    # The control: TRL's names need TRL. Still exit 2 naming the variable, before the (missing) model is looked at.
    r = run_job(job_env(**base, JOB_TRAIN__LEARNING_RAT="1"), python=IMPORTTIME, timeout=300)
    assert r.returncode == ExitCode.CONFIG, r.stderr[-2000:]
    assert "JOB_TRAIN__LEARNING_RAT: unknown variable: not a field of TRL's SFTConfig (did you mean JOB_TRAIN__LEARNING_RATE?)" in r.stderr
    assert {"transformers", "trl"} <= imported_modules(r.stderr) and "no-model" not in r.stderr
