"""Progress where platforms look for it (job/progress.py): step, total steps and ETA in the JSON log lines, and
Kubeflow Trainer's progress endpoint, here a loopback server that records what the job posts to it."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from job import progress

from conftest import DEMO_DATA, job_env, json_lines, run_job

STATUS_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs/qlora-trainjob-x/status"


@pytest.fixture
def status_server():
    """Stands in for the Trainer controller's status server: records each POST (path, Authorization, JSON body)."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": json.loads(body)})
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.received = received
    server.url = f"http://127.0.0.1:{server.server_address[1]}{STATUS_PATH}"
    yield server
    server.shutdown()
    server.server_close()


def test_a_trainjob_gets_progress_and_the_logs_carry_step_total_and_eta(status_server, tiny_model, tmp_path):
    token = tmp_path / "token"
    token.write_text("projected-sa-token\n")  # what the controller mounts at KUBEFLOW_TRAINER_SERVER_TOKEN
    r = run_job(job_env(
        KUBEFLOW_TRAINER_SERVER_URL=status_server.url, KUBEFLOW_TRAINER_SERVER_TOKEN=str(token),
        JOB_STAGE="sft", JOB_BASE_MODEL=str(tiny_model), JOB_DATA=str(DEMO_DATA / "sft.jsonl"),
        JOB_OUTPUT=str(tmp_path / "out"), JOB_WORKDIR=str(tmp_path / "work"), JOB_RUN_ID="p1", JOB_LOG_FORMAT="json",
        JOB_TRAIN__MAX_STEPS="4", JOB_TRAIN__LOGGING_STEPS="1", JOB_TRAIN__SAVE_STEPS="0",
        JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="2", JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1",
        JOB_TRAIN__MAX_LENGTH="128",
        # JOB_TRAIN__REPORT_TO is left at "none": inside a TrainJob progress is reported anyway.
    ))
    assert r.returncode == 0, r.stderr[-3000:]

    # The log lines: step, total steps and an ETA that counts down to 0.
    lines = [line for line in json_lines(r.stderr) if line.get("event") == "metrics" and "loss" in line]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert {line["total_steps"] for line in lines} == {4}
    etas = [line["eta_s"] for line in lines]
    assert all(e >= 0 for e in etas) and etas[-1] == 0 and etas[0] > 0

    # The Trainer controller heard about it: training began (0%, total steps), then ended (100%), with the token.
    posts = status_server.received
    assert posts, "nothing was posted to KUBEFLOW_TRAINER_SERVER_URL"
    assert {p["path"] for p in posts} == {STATUS_PATH}
    assert {p["auth"] for p in posts} == {"Bearer projected-sa-token"}
    first, last = posts[0]["body"]["trainerStatus"], posts[-1]["body"]["trainerStatus"]
    assert first["progressPercentage"] == 0 and {"name": "total_steps", "value": "4"} in first["metrics"]
    assert last["progressPercentage"] == 100 and last["estimatedRemainingSeconds"] == 0
    assert "train_loss" in {m["name"] for m in last["metrics"]}
    # Within what TrainJob.status.trainerStatus accepts (the vendored CRD: names and values of at most 64 characters).
    for p in posts:
        for m in p["body"]["trainerStatus"].get("metrics", []):
            assert 1 <= len(m["name"]) <= 64 and 1 <= len(m["value"]) <= 64, m


@pytest.mark.parametrize("env,setting,expected", [
    ({}, "none", []),
    ({}, "tensorboard", ["tensorboard"]),
    ({"KUBEFLOW_TRAINER_SERVER_URL": "https://trainer.kubeflow:8082/x"}, "none", ["kubeflow"]),
    ({"KUBEFLOW_TRAINER_SERVER_URL": "https://trainer.kubeflow:8082/x"}, "tensorboard", ["tensorboard", "kubeflow"]),
    ({"KUBEFLOW_TRAINER_SERVER_URL": "https://trainer.kubeflow:8082/x", "DISABLE_KUBEFLOW_INTEGRATION": "TRUE"},
     "none", []),
])
def test_the_training_arguments_report_to_kubeflow_only_inside_a_trainjob(monkeypatch, tmp_path, env, setting, expected):
    """The job leaves this to transformers (TrainingArguments adds "kubeflow" when the controller's variable is set);
    this pins that behaviour, through the job's own arguments, for the transformers the job is installed with."""

    from job.settings import load_settings
    from job.stages.common import training_args

    for name in ("KUBEFLOW_TRAINER_SERVER_URL", "DISABLE_KUBEFLOW_INTEGRATION"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = load_settings({"JOB_STAGE": "sft", "JOB_BASE_MODEL": "org/model", "JOB_DATA": "d.jsonl", "JOB_OUTPUT": "out",
                       "JOB_TRAIN__REPORT_TO": setting})
    args = training_args(s, tmp_path, has_eval=False, progress_bar=False)
    assert args.report_to == expected


def test_eta_counts_only_this_process_steps():
    now = [100.0]
    eta = progress.Eta(clock=lambda: now[0])
    assert eta.fields(40, 100) == {"total_steps": 100}  # not started
    eta.start(40)  # resumed at step 40
    assert eta.fields(40, 100) == {"total_steps": 100}  # nothing timed yet
    now[0] += 20.0
    assert eta.fields(50, 100) == {"total_steps": 100, "eta_s": 100.0}  # 2 s a step, 50 steps left
    now[0] += 100.0
    assert eta.fields(100, 100)["eta_s"] == 0
