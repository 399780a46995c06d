"""End to end through the Hugging Face Hub read path (hf://): `python -m job` subprocesses with HF_ENDPOINT pointing at
a fake Hub on loopback (tests/fake_hub.py) that serves a private model repo and a private dataset repo."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from job.exitcodes import ExitCode

from conftest import DEMO_DATA, FAKE_SECRET, job_env, run_job
from fake_hub import FakeHub

MODEL = "org/tiny-llama"
DATASET = "org/qa"


@pytest.fixture
def hub(tiny_model):
    with FakeHub(token=FAKE_SECRET) as hub:
        hub.model = hub.add_repo("model", MODEL, tiny_model, private=True)
        hub.dataset = hub.add_repo("dataset", DATASET, DEMO_DATA, private=True)
        yield hub


def hub_env(hub, tmp_path, **extra):
    env = job_env(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf"),  # an empty cache: everything comes from the fake Hub
        HF_TOKEN=FAKE_SECRET,
        JOB_STAGE="sft",
        JOB_BASE_MODEL=f"hf://{MODEL}",
        JOB_DATA=f"hf://datasets/{DATASET}/sft.jsonl",
        JOB_OUTPUT=str(tmp_path / "out"),
        JOB_WORKDIR=str(tmp_path / "work"),
        JOB_RUN_ID="r1",
        JOB_TRAIN__MAX_STEPS="2",
        JOB_TRAIN__SAVE_STEPS="0",
        JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="2",
        JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1",
        JOB_TRAIN__MAX_LENGTH="128",
        JOB_LOG_FORMAT="json",
    )
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(name, None)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_jobs(*envs):
    """Several `python -m job` at once: a failing run spends most of its time importing torch, transformers and TRL."""
    with ThreadPoolExecutor(len(envs)) as pool:
        return list(pool.map(run_job, envs))


def assert_no_secret(tmp_path, r, secret=FAKE_SECRET):
    assert secret not in r.stdout and secret not in r.stderr
    for p in (tmp_path / "out").rglob("*"):
        assert not p.is_file() or secret.encode() not in p.read_bytes(), p


def assert_failed_cleanly(tmp_path, r, code):
    assert r.returncode == code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))  # nothing published


def test_sft_from_private_hub_repos_records_revisions_and_sends_the_token(hub, tmp_path):
    r = run_job(hub_env(hub, tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out" / "r1"
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.json", "run.json", "_SUCCESS"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "succeeded" and run["config"]["hf_token"] == "***"
    inputs = run["inputs"]
    assert inputs["base_model"] == {"uri": f"hf://{MODEL}", "revision": hub.model.sha}
    assert inputs["train"]["uri"] == f"hf://datasets/{DATASET}/sft.jsonl"
    assert inputs["train"]["revision"] == hub.dataset.sha
    assert list(inputs["train"]["sha256"].values())[0]  # the data file's checksum too

    # Every request for the private repos carried the token; only the allowed files were downloaded.
    repo_requests = [q for q in hub.requests if MODEL in q.path or DATASET in q.path]
    assert repo_requests and {q.authorization for q in repo_requests} == {f"Bearer {FAKE_SECRET}"}
    got = {q.path.rsplit("/", 1)[-1] for q in repo_requests if q.method == "GET" and "/resolve/" in q.path}
    assert "model.safetensors" in got and "sft.jsonl" in got and "dpo.csv" not in got
    assert_no_secret(tmp_path, r)


def test_private_repo_with_a_wrong_or_no_token(hub, tmp_path):
    wrong = "hf_WRONGtoken0987654321zyxwvu"
    # Local data, so that the failure is the model's download (data is read first).
    bad, anonymous = run_jobs(hub_env(hub, tmp_path / "bad", HF_TOKEN=wrong, JOB_DATA=str(DEMO_DATA / "sft.jsonl")),
                              hub_env(hub, tmp_path / "anon", HF_TOKEN=None, JOB_DATA=str(DEMO_DATA / "sft.jsonl")))
    # A token the Hub doesn't know: 401 "Invalid credentials in Authorization header" -> a configuration error.
    assert_failed_cleanly(tmp_path / "bad", bad, ExitCode.CONFIG)
    assert f"hf://{MODEL}: access denied (401); check HF_TOKEN" in bad.stderr
    assert_no_secret(tmp_path / "bad", bad, wrong)
    # No token: the Hub answers an anonymous request for a private repo exactly as for a missing one (401 RepoNotFound),
    # so the job can't tell "private" from "not there": a missing base model, exit 4 (MODEL), with a hint to set HF_TOKEN.
    assert_failed_cleanly(tmp_path / "anon", anonymous, ExitCode.MODEL)
    assert f"JOB_BASE_MODEL: hf://{MODEL}: repository not found (or private: set HF_TOKEN)" in anonymous.stderr
    model_auth = {q.authorization for q in hub.requests if MODEL in q.path}
    assert model_auth == {f"Bearer {wrong}", None}


def test_unknown_repo_or_revision_is_a_data_error(hub, tmp_path):
    repo_uri = "hf://datasets/org/no-such-dataset/sft.jsonl"
    rev_uri = f"hf://datasets/{DATASET}@no-such-tag/sft.jsonl"
    repo, rev = run_jobs(hub_env(hub, tmp_path / "repo", JOB_DATA=repo_uri), hub_env(hub, tmp_path / "rev", JOB_DATA=rev_uri))
    assert_failed_cleanly(tmp_path / "repo", repo, ExitCode.DATA)
    assert f"{repo_uri}: repository not found" in repo.stderr
    assert_failed_cleanly(tmp_path / "rev", rev, ExitCode.DATA)
    assert f"{rev_uri}: revision 'no-such-tag' not found" in rev.stderr
    assert not any(MODEL in q.path for q in hub.requests)  # both failed before the model was downloaded
    assert_no_secret(tmp_path / "repo", repo)
    assert_no_secret(tmp_path / "rev", rev)


def test_revision_pins_are_used_and_recorded(hub, tmp_path):
    old = hub.model.refs["v1"]
    assert old != hub.model.sha
    # The model pinned to a commit sha, the data to a tag: both are recorded as the commit they resolved to.
    r = run_job(hub_env(hub, tmp_path, JOB_BASE_MODEL=f"hf://{MODEL}@{old}", JOB_DATA=f"hf://datasets/{DATASET}@v1/sft.jsonl"))
    assert r.returncode == 0, r.stderr[-3000:]
    inputs = json.loads((tmp_path / "out" / "r1" / "run.json").read_text())["inputs"]
    assert inputs["base_model"] == {"uri": f"hf://{MODEL}@{old}", "revision": old}
    assert inputs["train"]["uri"] == f"hf://datasets/{DATASET}@v1/sft.jsonl"
    assert inputs["train"]["revision"] == hub.dataset.refs["v1"]
    model_files = [q.path for q in hub.requests if q.path.startswith(f"/{MODEL}/resolve/")]
    assert model_files and all(p.startswith(f"/{MODEL}/resolve/{old}/") for p in model_files)
    assert_no_secret(tmp_path, r)
