"""End to end through the Hugging Face Hub (hf://): `python -m job` subprocesses with HF_ENDPOINT pointing at a fake Hub
on loopback (tests/fake_hub.py) that serves a private model repo and a private dataset repo and takes uploads the way
huggingface_hub sends them (repo creation, preupload, LFS, commit, tag)."""

import hashlib
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml

from job.exitcodes import ExitCode

from conftest import DEMO_DATA, FAKE_SECRET, job_env, run_job
from fake_hub import FakeHub

MODEL = "org/tiny-llama"
DATASET = "org/qa"


READ_ONLY = "hf_READonlyTOKEN1234567890abcd"


@pytest.fixture
def hub(tiny_model):
    with FakeHub(token=FAKE_SECRET, read_token=READ_ONLY) as hub:
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
    # The fake Hub takes uploads through LFS; with hf_xet installed (the image has it) huggingface_hub would upload to
    # a Xet storage server instead, which the fake does not implement.
    env["HF_HUB_DISABLE_XET"] = "1"
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
    assert f"JOB_BASE_MODEL: hf://{MODEL}: access denied (401); check HF_TOKEN" in bad.stderr
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


# --- pushing to the Hub ---------------------------------------------------------------------------------------------

RUNS = "org/runs"

#: What a user runs after the job: the seed's loading code against the Hub, by repo id (HF_ENDPOINT: the fake Hub).
LOAD_BY_ID = """
import json, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ids = torch.tensor([[1, 5, 9, 12, 40, 77]])
base = lambda: AutoModelForCausalLM.from_pretrained("org/tiny-llama")
with torch.no_grad():
    out = {"base": base()(ids).logits,
           "subfolder": PeftModel.from_pretrained(base(), "org/runs", subfolder="sft-1/adapter")(ids).logits,
           "latest": PeftModel.from_pretrained(base(), "org/runs")(ids).logits,
           "revision": PeftModel.from_pretrained(base(), "org/runs", revision="sft-1")(ids).logits}
print(json.dumps({k: v.tolist() for k, v in out.items()}))
"""


def python(code: str, env: dict, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


def snippet(card: str) -> str:
    """The Python block of a model card, exactly as written."""
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def commit_files(hub, sha=None) -> dict[str, bytes]:
    repo = hub.repo(RUNS)
    return repo.commit(sha or repo.sha).files


def test_sft_pushes_one_commit_to_a_new_private_repo_that_loads_by_id_and_dpo_continues_from_it(hub, tmp_path):
    assert hub.repo(RUNS) is None
    sft = run_job(hub_env(hub, tmp_path / "sft", JOB_OUTPUT=f"hf://{RUNS}", JOB_RUN_ID="sft-1",
                          JOB_TRAIN__LEARNING_RATE="5e-2", JOB_TRAIN__MAX_STEPS="3"))
    assert sft.returncode == 0, sft.stderr[-3000:]
    repo = hub.repo(RUNS)
    assert repo.private  # JOB_HUB_PRIVATE's default
    # One commit for the run's outputs, named and tagged after the run. Before it: the run's identity, recorded at the
    # start, and its checkpoints (the last one at the end of training); after it: the checkpoints' deletion.
    messages = [c.message for c in repo.log]
    assert messages.count("qlora-job sft sft-1") == 1 and messages[0] == "initial commit"
    assert messages[1] == "qlora-job: upload sft-1/identity.json"
    sft_commit = next(c for c in repo.log if c.message == "qlora-job sft sft-1")
    assert repo.refs["sft-1"] == sft_commit.sha
    assert all(m.startswith("qlora-job: upload sft-1/checkpoints/") for m in messages[2:messages.index("qlora-job sft sft-1")])
    assert not [f for f in repo.files() if "/checkpoints/" in f]  # removed once the run is complete
    files = sft_commit.files
    run_files = {"_SUCCESS", "metrics.json", "metrics.jsonl", "run.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "adapter/README.md", "adapter/prompt_format.json",
                 "adapter/tokenizer.json", "adapter/tokenizer_config.json", "adapter/chat_template.jinja"}
    assert {f"sft-1/{f}" for f in run_files} <= set(files)
    # The repository's root holds the adapter too, so that it loads by the repo's id alone.
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json"):
        assert files[name] == files[f"sft-1/adapter/{name}"], name
    # Weights went through LFS (batch API, upload, verify), small text files inline.
    weights = files["sft-1/adapter/adapter_model.safetensors"]
    assert hashlib.sha256(weights).hexdigest() in hub.lfs_objects
    assert "sft-1/adapter/adapter_model.safetensors" in sft_commit.lfs and "sft-1/run.json" not in sft_commit.lfs
    # The adapter names its base by the public id, not the pod's download folder.
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == MODEL
    assert f"\nbase_model: {MODEL}\n" in files["README.md"].decode()
    writes = [q for q in hub.requests if q.method in ("POST", "PUT") and not q.path.startswith("/lfs-objects/")]
    assert {q.authorization for q in writes} == {f"Bearer {FAKE_SECRET}"}
    assert not any(FAKE_SECRET.encode() in data for data in files.values())
    assert FAKE_SECRET not in sft.stderr + sft.stdout

    # A user loads it as the seed does: by repo id, with a subfolder (this run) or a revision (the run's tag).
    user_env = {k: v for k, v in hub_env(hub, tmp_path / "user").items() if not k.startswith("JOB_")}
    loaded = python(LOAD_BY_ID, user_env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    logits = {k: torch.tensor(v) for k, v in json.loads(loaded.stdout).items()}
    assert torch.equal(logits["subfolder"], logits["latest"]) and torch.equal(logits["subfolder"], logits["revision"])
    assert (logits["subfolder"] - logits["base"]).abs().max() > 1e-3  # the adapter is there and does something
    # The model card's snippet runs as written, against the Hub.
    card = python(snippet(files["sft-1/adapter/README.md"].decode()), user_env)
    assert card.returncode == 0, card.stderr[-3000:]
    assert 'subfolder="sft-1/adapter"' in files["README.md"].decode()
    # The card's header follows the Hub's conventions (the fake Hub validated it when it was pushed), with the run's
    # held-out figures as eval results; its text says what the adapter was trained on.
    card = files["sft-1/adapter/README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta in hub.metadata
    assert (meta["base_model"], meta["base_model_relation"], meta["library_name"]) == (MODEL, "adapter", "peft")
    assert meta["datasets"] == [DATASET] and {"qlora-job", "sft", "qlora"} <= set(meta["tags"])
    results = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert results["exact_match"] == json.loads(files["sft-1/metrics.json"])["generation_exact_match_after"]
    assert "quantized to 4-bit NF4" in card

    # DPO starts from the repo, as the seed's second notebook does, and pushes to the same repo.
    main_before_dpo = repo.refs["main"]  # the SFT run's commit, then the deletion of its checkpoints: same files at the root
    dpo = run_job(hub_env(hub, tmp_path / "dpo", JOB_STAGE="dpo", JOB_DATA=f"hf://datasets/{DATASET}/dpo.csv",
                          JOB_ADAPTER=f"hf://{RUNS}", JOB_OUTPUT=f"hf://{RUNS}", JOB_RUN_ID="dpo-1"))
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    assert [c.message for c in repo.log].count("qlora-job dpo dpo-1") == 1
    files = commit_files(hub)
    run = json.loads(files["dpo-1/run.json"])
    assert run["inputs"]["adapter"] == {"uri": f"hf://{RUNS}", "revision": main_before_dpo}
    assert run["prompt_format"] == json.loads(commit_files(hub, sft_commit.sha)["sft-1/run.json"])["prompt_format"]
    assert files["adapter_model.safetensors"] == files["dpo-1/adapter/adapter_model.safetensors"] != weights
    assert files["sft-1/adapter/adapter_model.safetensors"] == weights  # the SFT run stays where it was
    dpo_commit = next(c for c in repo.log if c.message == "qlora-job dpo dpo-1")
    assert repo.refs["sft-1"] == sft_commit.sha and repo.refs["dpo-1"] == dpo_commit.sha
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == MODEL
    # The DPO card names the SFT adapter it started from (its frozen reference).
    card = files["dpo-1/adapter/README.md"].decode()
    assert f"It started from the adapter `hf://{RUNS}`, also DPO's frozen reference." in card
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta in hub.metadata and meta["base_model_relation"] == "adapter" and "dpo" in meta["tags"]


def test_push_errors_fail_before_any_download_with_their_exit_codes(hub, tmp_path):
    hub.add_repo("model", RUNS, DEMO_DATA, private=True)
    wrong = "hf_WRONGtoken0987654321zyxwvu"
    local_data = str(DEMO_DATA / "sft.jsonl")
    read_only, new_repo, bad, anonymous, public = run_jobs(
        hub_env(hub, tmp_path / "ro", HF_TOKEN=READ_ONLY, JOB_OUTPUT=f"hf://{RUNS}", JOB_DATA=local_data),
        hub_env(hub, tmp_path / "new", HF_TOKEN=READ_ONLY, JOB_OUTPUT="hf://org/new-runs", JOB_DATA=local_data),
        hub_env(hub, tmp_path / "bad", HF_TOKEN=wrong, JOB_OUTPUT=f"hf://{RUNS}", JOB_BASE_MODEL=str(DEMO_DATA)),
        hub_env(hub, tmp_path / "anon", HF_TOKEN=None, JOB_OUTPUT="hf://org/anon-runs", JOB_DATA=local_data),
        # A public repo on request; the run then fails on its data (exit 3), after the repo was made.
        hub_env(hub, tmp_path / "pub", JOB_OUTPUT="hf://org/public-runs", JOB_HUB_PRIVATE="false",
                JOB_DATA=str(tmp_path / "no-such.jsonl")),
    )
    # A token that may read but not write: the existing repo, and a repo it would have to create.
    for r, repo_id in ((read_only, RUNS), (new_repo, "org/new-runs")):
        assert r.returncode == ExitCode.CONFIG, r.stderr[-3000:]
        assert f"JOB_OUTPUT: hf://{repo_id}: HF_TOKEN has no write access to {repo_id} (403)" in r.stderr
        assert "Traceback" not in r.stderr and READ_ONLY not in r.stderr + r.stdout
    assert hub.repo("org/new-runs") is None
    # A token the Hub doesn't know; no token at all.
    assert bad.returncode == ExitCode.CONFIG, bad.stderr[-3000:]
    assert f"JOB_OUTPUT: hf://{RUNS}: the Hub refused HF_TOKEN (401)" in bad.stderr and wrong not in bad.stderr
    assert anonymous.returncode == ExitCode.CONFIG, anonymous.stderr[-3000:]
    assert "hf://org/anon-runs: writing to the Hub needs a token with write access: set HF_TOKEN" in anonymous.stderr
    # None of them downloaded the model or wrote anything.
    assert not [q for q in hub.requests if f"/{MODEL}/resolve/" in q.path]
    assert [c.message for c in hub.repo(RUNS).log] == ["v1", "main"]
    assert public.returncode == ExitCode.DATA, public.stderr[-3000:]
    assert not hub.repo("org/public-runs").private
    assert list(hub.repo("org/public-runs").files()) == [".gitattributes"]


def test_an_unreachable_hub_names_the_variable_the_endpoint_and_the_cause(hub, tmp_path):
    """No network: the error said only "Hugging Face Hub request failed: RevisionResolutionError"."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    down = run_job(hub_env(hub, tmp_path, HF_ENDPOINT=closed, JOB_DATA=str(DEMO_DATA / "sft.jsonl")), "--check")
    assert_failed_cleanly(tmp_path, down, ExitCode.TRANSIENT)
    assert f"JOB_BASE_MODEL: hf://{MODEL}: the Hub at {closed} can't be reached (ConnectError)" in down.stderr, down.stderr[-2000:]
    assert "RevisionResolutionError" not in down.stderr


def test_a_token_that_ends_with_a_newline_is_used_without_it(hub, tmp_path):
    """A token from a file (a Kubernetes secret made --from-file, `echo` into a file) ends with a newline, which no
    HTTP header may hold: every request failed as if the Hub were unreachable. It is cleaned as huggingface_hub cleans
    the HF_TOKEN it reads itself, and still never printed."""
    r = run_job(hub_env(hub, tmp_path, HF_TOKEN=FAKE_SECRET + "\n", JOB_DATA=str(DEMO_DATA / "sft.jsonl")), "--check")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {q.authorization for q in hub.requests if MODEL in q.path} >= {f"Bearer {FAKE_SECRET}"}
    assert_no_secret(tmp_path, r)


def test_offline_runs_use_the_cache_and_a_cache_miss_is_permanent(hub, tmp_path):
    local_data = str(DEMO_DATA / "sft.jsonl")
    online = run_job(hub_env(hub, tmp_path, JOB_DATA=local_data), "--check")  # caches the tokenizer and config only
    assert online.returncode == 0, online.stderr[-3000:]
    before = len(hub.requests)
    offline = {"HF_HUB_OFFLINE": "1", "JOB_DATA": local_data}
    with ThreadPoolExecutor(3) as pool:
        check, partial, missing = pool.map(lambda a: run_job(*a), [
            (hub_env(hub, tmp_path, **offline), "--check"),
            # Two runs at once need a run id and a scratch folder each: one id's second run is refused (the run lock).
            (hub_env(hub, tmp_path, **offline, JOB_RUN_ID="partial", JOB_WORKDIR=str(tmp_path / "w-partial")),),  # the weights were never downloaded
            (hub_env(hub, tmp_path, **offline, JOB_RUN_ID="missing", JOB_WORKDIR=str(tmp_path / "w-missing"),
                     JOB_BASE_MODEL="hf://org/never-downloaded"),),
        ])
    assert check.returncode == 0, check.stderr[-3000:]
    for r, uri in ((partial, f"hf://{MODEL}"), (missing, "hf://org/never-downloaded")):
        # Retrying can't fill the cache: a model problem (exit 4), not a transient one (75).
        assert r.returncode == ExitCode.MODEL, r.stderr[-3000:]
        # (the weights' error names the commit the run identified: hf://org/model@sha)
        assert re.search(rf"JOB_BASE_MODEL: {re.escape(uri)}(@[0-9a-f]{{40}})?: not in the local Hugging Face cache", r.stderr)
        assert "offline mode is on (HF_HUB_OFFLINE=1)" in r.stderr and "Traceback" not in r.stderr
    assert len(hub.requests) == before  # offline means offline


@pytest.fixture
def hub_in_process(monkeypatch):
    """A fake Hub for code running in this process: huggingface_hub read HF_ENDPOINT when it was imported."""
    from huggingface_hub import constants

    with FakeHub(token=FAKE_SECRET) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield hub


@pytest.mark.parametrize("prefix", ["", "experiments"])
def test_each_publish_is_one_commit_and_replaces_the_artifact_at_the_output_root(tmp_path, hub_in_process, prefix):
    """In process: an adapter run, then a merge run, to the same output. The root (of the repo, or of the output's
    folder) holds the latest run's artifact only, so it never mixes an adapter with a merged model; the user's other
    files stay; every run keeps its own folder."""
    from job import outputs, storage
    from job.storage import HfUri

    hub = hub_in_process

    def run_folder(name, stage, artifact, files):
        local = tmp_path / name / "out"
        (local / artifact).mkdir(parents=True)
        for f, content in files.items():
            (local / artifact / f).write_bytes(content)
        (local / "run.json").write_text(json.dumps({"stage": stage}))
        return local

    output = HfUri("org/serve", "model", None, prefix)
    storage.prepare_output(output, FAKE_SECRET)
    storage.push(DEMO_DATA / "sft.jsonl", output.join("NOTES.jsonl"), FAKE_SECRET, message="the user's own file")
    sft = run_folder("sft", "sft", "adapter", {"adapter_config.json": b"{}", "adapter_model.safetensors": b"A" * 64,
                                                "tokenizer.json": b"{}", "README.md": b"# adapter\n"})
    outputs.publish(sft, output.join("sft-1"), FAKE_SECRET)
    merged = run_folder("merge", "merge", "merged", {"config.json": b"{}", "model.safetensors": b"M" * 64,
                                                      "tokenizer.json": b'{"v": 2}', "README.md": b"# merged\n"})
    outputs.publish(merged, output.join("merge-1"), FAKE_SECRET)

    repo = hub.repo("org/serve")
    assert [c.message for c in repo.log] == ["initial commit", "the user's own file", "qlora-job sft sft-1",
                                             "qlora-job merge merge-1"]
    root = f"{prefix}/" if prefix else ""
    files = repo.files()
    at_root = {f[len(root):] for f in files if f.startswith(root) and "/" not in f[len(root):]}
    assert at_root - {".gitattributes"} == {"NOTES.jsonl", "config.json", "model.safetensors", "tokenizer.json",
                                             "README.md"}
    assert files[f"{root}tokenizer.json"] == b'{"v": 2}' and files[f"{root}README.md"] == b"# merged\n"
    for run, names in (("sft-1", ("adapter/adapter_model.safetensors", "_SUCCESS")),
                       ("merge-1", ("merged/model.safetensors", "run.json", "_SUCCESS"))):
        for name in names:
            assert f"{root}{run}/{name}" in files
    assert repo.commit(repo.refs["sft-1"]).files[f"{root}adapter_model.safetensors"] == b"A" * 64
    assert repo.refs["merge-1"] == repo.sha


def test_an_output_on_a_branch_is_created_and_committed_there(tmp_path, hub_in_process):
    from job import outputs, storage
    from job.storage import HfUri

    hub = hub_in_process
    output = HfUri("org/exp", "model", "ablation", "")
    assert not storage.exists(output.join("r1", "_SUCCESS"), FAKE_SECRET)  # no repo yet: not done, not an error
    storage.prepare_output(output, FAKE_SECRET)
    local = tmp_path / "out"
    (local / "adapter").mkdir(parents=True)
    (local / "adapter" / "adapter_config.json").write_text("{}")
    outputs.publish(local, output.join("r1"), FAKE_SECRET)
    repo = hub.repo("org/exp")
    assert "r1/_SUCCESS" in repo.files("ablation") and "r1/_SUCCESS" not in repo.files("main")
    assert storage.exists(output.join("r1", "_SUCCESS"), FAKE_SECRET)
