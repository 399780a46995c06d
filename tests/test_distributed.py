"""Several processes (what entrypoint.sh starts with several GPUs): the same code path through torchrun, on CPU
with the gloo backend. One run id, one upload, DDP over both processes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO_DATA, ROOT, Watchdog, job_env, run_processes


def test_two_processes_train_one_run_and_upload_once(tiny_model, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(tiny_model), JOB_DATA=str(DEMO_DATA / "sft.jsonl"), JOB_OUTPUT=str(tmp_path / "out"),
                  JOB_WORKDIR=str(tmp_path / "w"), JOB_TRAIN__MAX_STEPS="3", JOB_TRAIN__LOGGING_STEPS="1", JOB_TRAIN__SAVE_STEPS="2",
                  JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="1", JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1", JOB_TRAIN__MAX_LENGTH="128",
                  OMP_NUM_THREADS="1")
    r = run_processes([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "job"], env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "out").iterdir())
    assert len(runs) == 1  # the generated run id is rank 0's on both processes
    run = json.loads((runs[0] / "run.json").read_text())
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert run["world_size"] == 2 and metrics["world_size"] == 2 and metrics["steps"] == 3
    assert abs(metrics["tokens_per_second_per_device"] * 2 - metrics["tokens_per_second"]) < 0.1
    assert (runs[0] / "_SUCCESS").exists() and (runs[0] / "adapter" / "adapter_model.safetensors").exists()
    lines = r.stderr.splitlines()  # rank 0 alone uploads: one checkpoint upload, one _SUCCESS upload
    assert sum("checkpoint checkpoint-2 uploaded" in l for l in lines) == 1
    assert sum("uploading" in l and "_SUCCESS" in l for l in lines) == 1


def test_bad_data_with_two_processes_is_one_data_error_not_a_crash_of_the_other(tiny_model, tmp_path):
    """The node's first process reads the data while the other waits: its error (exit 3, file and row) is the one
    reported; the waiting process does not add an "internal error" of its own."""
    (tmp_path / "bad.jsonl").write_text('{"text": "Q", "output": "A"}\n{"text": "Q2"}\n', encoding="utf-8")
    launch = [sys.executable, str(ROOT / "docker" / "launch.py"), "--standalone", "--nproc-per-node", "2", "-m", "job"]
    env = job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(tiny_model), JOB_DATA=str(tmp_path / "bad.jsonl"),
                  JOB_OUTPUT=str(tmp_path / "out"), JOB_WORKDIR=str(tmp_path / "w"), OMP_NUM_THREADS="1")
    r = run_processes(launch, env, timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "bad.jsonl: row 2" in r.stderr and "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


def _workers(launcher_pid: int) -> dict[int, int]:
    """torchrun's worker processes (children of the launcher), by their RANK."""

    out = {}
    for children in Path(f"/proc/{launcher_pid}/task").glob("*/children"):
        for pid in map(int, children.read_text().split()):
            env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
            if "RANK" in env:
                out[int(env["RANK"])] = pid
    return out


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_and_the_run_resumes(tiny_model, tmp_path):
    """What a multi-node reclaim does: only one process is signalled (here rank 1, which doesn't upload). All ranks
    must save the same step and exit 143 (a rank stopping alone left the others waiting in a collective for good)."""
    import os
    import signal

    from job.exitcodes import ExitCode

    launch = [sys.executable, str(ROOT / "docker" / "launch.py"), "--standalone", "--nproc-per-node", "2", "-m", "job"]
    env = job_env(JOB_STAGE="sft", JOB_BASE_MODEL=str(tiny_model), JOB_DATA=str(DEMO_DATA / "sft.jsonl"), JOB_OUTPUT=str(tmp_path / "out"),
                  JOB_WORKDIR=str(tmp_path / "w"), JOB_RUN_ID="multi", JOB_TRAIN__MAX_STEPS="30", JOB_TRAIN__SAVE_STEPS="0",
                  JOB_TRAIN__LOGGING_STEPS="1", JOB_LOG_FORMAT="json", JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE="1",
                  JOB_TRAIN__GRADIENT_ACCUMULATION_STEPS="1", JOB_TRAIN__MAX_LENGTH="128", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(launch, env={**env, "PYTHONFAULTHANDLER": "1"}, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    # One hard deadline for the whole attempt (a hang while waiting for a line would otherwise never time out).
    with Watchdog(proc, 480) as dog:
        seen = []
        for line in proc.stderr:  # rank 0 logs each step: wait until training is under way
            seen.append(line)
            if '"event": "metrics"' in line and '"step": 3,' in line:
                break
        if dog.fired or proc.poll() is not None:
            pytest.fail("training did not start (hung or exited); stacks and log:\n" + "".join(seen)[-20000:])
        workers = _workers(proc.pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGTERM)
        _, rest = proc.communicate()
    if dog.fired:
        pytest.fail("the processes did not stop after SIGTERM to rank 1 (deadlock); stacks:\n" + rest[-20000:])
    assert proc.returncode == ExitCode.PREEMPTED, rest[-3000:]
    assert "SIGTERM (on another process): saving a checkpoint after this step" in rest  # rank 0 heard of it
    run = tmp_path / "out" / "multi"
    done = sorted(run.glob("checkpoints/checkpoint-*/_COMPLETE"))
    assert len(done) == 1 and not (run / "_SUCCESS").exists()
    step = int(done[0].parent.name.split("-")[1])
    # Both ranks saved this same step: each process's RNG state is in the one checkpoint.
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in done[0].parent.iterdir()}
    assert 3 <= step < 30

    # The retried pod group: same run id and config, fresh disks; it continues from that checkpoint and finishes.
    env.update(JOB_WORKDIR=str(tmp_path / "w2"))
    r = run_processes(launch, env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((run / "run.json").read_text())
    assert meta["resumed_from"] == f"checkpoint-{step}" and meta["world_size"] == 2
    assert json.loads((run / "metrics.json").read_text())["steps"] == 30 and (run / "_SUCCESS").exists()


AGREE = r'''
import json, os, sys, time
import torch, torch.distributed as dist
from job.checkpoints import StopSignal

dist.init_process_group("nccl")
rank = dist.get_rank()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
torch.cuda.set_device(device)
stop = StopSignal()
for _ in range(50):
    assert stop.agree(device) is None
n = 1000
t0 = time.perf_counter()
for _ in range(n):
    stop.agree(device)
per_step = (time.perf_counter() - t0) / n
if rank == 1:
    stop.signalled = stop.received = "SIGTERM"  # what StopSignal._handle records
print(json.dumps({"rank": rank, "us_per_step": round(per_step * 1e6, 1), "stop": stop.agree(device)}), flush=True)
dist.destroy_process_group()
'''


@pytest.mark.gpu
def test_stop_agreement_over_nccl_on_two_gpus(tmp_path):
    """The agreement's all-reduce on NCCL (tensors on each rank's GPU): a signal on rank 1 reaches rank 0, and the
    check costs a small fraction of a training step. The SIGTERM test above also runs on NCCL where 2 GPUs are visible."""
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    r = run_processes([torchrun, "--standalone", "--nproc-per-node", "2", str(script)], job_env(PYTHONPATH=str(ROOT)), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {d["rank"]: d for d in map(json.loads, (l for l in r.stdout.splitlines() if l.startswith("{")))}
    print(rows)
    assert rows[0]["stop"] == "SIGTERM (on another process)" and rows[1]["stop"] == "SIGTERM"
    assert rows[0]["us_per_step"] < 1000  # one small all-reduce and a sync per optimizer step


def test_a_hung_process_group_fails_with_every_workers_stack_instead_of_hanging(tmp_path):
    """The harness the tests above run under: two workers that never finish are aborted at the deadline, the test
    fails (not hangs) and the message shows where each worker was; no process is left behind."""
    script = tmp_path / "hang.py"
    script.write_text("import os, time\nprint('ready', os.environ['RANK'], flush=True)\ntime.sleep(600)\n")
    launch = [sys.executable, str(ROOT / "docker" / "launch.py"), "--standalone", "--nproc-per-node", "2", str(script)]
    with pytest.raises(pytest.fail.Exception) as e:
        run_processes(launch, job_env(), timeout=20)
    message = str(e.value)
    assert "did not finish within 20 s" in message
    # Each worker's stack, at its sleep. Both dump to the one stderr at once, so their lines can interleave (CI once
    # printed 'hang.py", line Current thread 0x... 3 in <module>'); faulthandler writes a file name in one piece.
    assert message.count("hang.py") >= 2, message[-3000:]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(script) not in ps


SAVE = r'''
import json, sys, time
from pathlib import Path
from types import SimpleNamespace
import torch.distributed as dist
from job import storage
from job.checkpoints import CheckpointCallback, StopSignal

dist.init_process_group("gloo")
rank = dist.get_rank()
root, remote = Path(sys.argv[1]), storage.parse_uri(sys.argv[2])
for step, nodes in ((5, 1), (6, 2)):
    callback = CheckpointCallback(remote.join(f"{nodes}-node"), StopSignal(), None)  # one node (a shared disk), then two (a disk each, one process per node)
    out = root / (f"node{rank}" if nodes == 2 else "node0")
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (folder / "adapter_model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
        (folder / "trainer_state.json").write_text("{}")
    else:
        time.sleep(2)  # the Trainer of rank 1 is still writing its RNG state when rank 0 reaches on_save
    (folder / f"rng_state_{rank}.pth").write_bytes(b"rng")
    args = SimpleNamespace(output_dir=str(out), process_index=rank, local_process_index=0 if nodes == 2 else rank)
    callback.on_save(args, SimpleNamespace(global_step=step, is_world_process_zero=rank == 0), None)
dist.destroy_process_group()
'''


def test_a_checkpoint_is_marked_complete_only_with_every_ranks_files_from_every_node(tmp_path):
    """on_save ran on rank 0 while rank 1 was still writing rng_state_1.pth, and another node's RNG files were never
    uploaded: the checkpoint was marked complete without them, and exact resume quietly broke. Here rank 1 writes its
    file 2 s late, on a shared disk (one node) and then on a disk of its own (two nodes); older local checkpoints are
    pruned once the new one is up."""
    script = tmp_path / "save.py"
    script.write_text(SAVE)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    remote = tmp_path / "remote"
    r = run_processes([torchrun, "--standalone", "--nproc-per-node", "2", str(script), str(tmp_path / "local"), str(remote)],
                      job_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    for step, nodes in ((5, 1), (6, 2)):
        folder = remote / f"{nodes}-node" / f"checkpoint-{step}"
        uploaded = {p.name for p in folder.iterdir()} if folder.exists() else set()
        assert {"rng_state_0.pth", "rng_state_1.pth", "_COMPLETE"} <= uploaded, (nodes, uploaded)
    assert json.loads((remote / "2-node" / "checkpoint-6" / "_COMPLETE").read_text())["files"]["rng_state_0.pth"] == 3
    assert not (tmp_path / "local" / "node0" / "checkpoint-5").exists()  # and so does the local disk
    assert (tmp_path / "local" / "node0" / "checkpoint-6").exists()
