#!/usr/bin/env bash
# Submit one fine-tuning run to Kubernetes: render an overlay of k8s/ with the chosen env file and image, give the
# Job (or JobSet, or Kubeflow TrainJob) a unique name, which is also the run id, and create it. Needs bash, awk and kubectl; usable from
# any CI. See docs/kubernetes.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: k8s/submit.sh [options] ENV_FILE [IMAGE] [NAME=VALUE ...]

  ENV_FILE        the run's settings, docker --env-file format (e.g. docker/sft.env). No secrets in it: they come
                  from the Secret qlora-job-secrets or a workload identity.
  IMAGE           the job image, e.g. ghcr.io/acme/qlora-job:0.1.0 (default: $QLORA_IMAGE)
  NAME=VALUE      overrides a setting of ENV_FILE, e.g. JOB_TRAIN__LEARNING_RATE=1e-4 (repeatable)

Options:
  --overlay NAME|DIR    sft, dpo, sweep, multigpu, multinode, trainjob (k8s/overlays/NAME), or a directory holding
                        your own kustomization built on one of them. Default: JOB_STAGE of ENV_FILE (sft or dpo).
  --sft-run RUN_ID      set JOB_ADAPTER to JOB_OUTPUT/RUN_ID/adapter/ (a DPO run on top of that SFT run)
  --suffix SUFFIX       name suffix: the run id is <overlay's name>-SUFFIX (default: UTC time and 4 random hex
                        digits). Lowercase letters, digits and '-'.
  --component NAME      add k8s/components/NAME (hf-cache-pvc, workload-identity, kueue); repeatable
  --queue NAME          submit through the Kueue LocalQueue NAME
  -n, --namespace NS    namespace (default: kubectl's current one)
  --dry-run             print the manifests that would be created and touch no cluster
  --server-dry-run      let the API server validate the manifests (kubectl create --dry-run=server); create nothing
  --wait                wait until the run has finished; exit 0 if it succeeded, 1 if it failed
  --wait-timeout SEC    with --wait: give up (exit 124) after SEC seconds (default: no limit)
  -h, --help            this help

Environment: KUBECTL (default: kubectl), QLORA_IMAGE, QLORA_POLL_SECONDS (default: 30).
EOF
}

die() { echo "submit.sh: $*" >&2; exit 2; }
note() { echo "submit.sh: $*" >&2; }

KUBECTL="${KUBECTL:-kubectl}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
placeholder_image="ghcr.io/OWNER/qlora-job"
# Never written into a ConfigMap (they would be readable by anyone who can read ConfigMaps).
secret_names=" HF_TOKEN HUGGING_FACE_HUB_TOKEN AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN "

overlay="" sft_run="" suffix="" namespace="" queue=""
dry_run=0 server_dry_run=0 wait=0 wait_timeout=0
components=() overrides=()
env_file="" image=""

need_arg() { if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi; }
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --overlay) need_arg "$@"; overlay="$2"; shift 2 ;;
        --sft-run) need_arg "$@"; sft_run="$2"; shift 2 ;;
        --suffix) need_arg "$@"; suffix="$2"; shift 2 ;;
        --component) need_arg "$@"; components+=("$2"); shift 2 ;;
        --queue) need_arg "$@"; queue="$2"; shift 2 ;;
        -n|--namespace) need_arg "$@"; namespace="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --server-dry-run) server_dry_run=1; shift ;;
        --wait) wait=1; shift ;;
        --wait-timeout) need_arg "$@"; wait_timeout="$2"; shift 2 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *=*) overrides+=("$1"); shift ;;
        *)
            if [ -z "$env_file" ]; then env_file="$1"
            elif [ -z "$image" ]; then image="$1"
            else die "unexpected argument $1 (see --help)"
            fi
            shift ;;
    esac
done
for arg in "$@"; do
    case "$arg" in *=*) overrides+=("$arg") ;; *) die "unexpected argument $arg" ;; esac
done

[ -n "$env_file" ] || { usage >&2; exit 2; }
[ -f "$env_file" ] || die "no such env file: $env_file"
image="${image:-${QLORA_IMAGE:-}}"
[[ "$wait_timeout" =~ ^[0-9]+$ ]] || die "--wait-timeout takes seconds"

tmp="$(mktemp -d "$here/.submit.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
run_env="$tmp/run.env"
: > "$run_env"

# --- settings: ENV_FILE, then the overrides -------------------------------------------------------------------------
get_var() { awk -v k="$1" 'index($0, k "=") == 1 { v = substr($0, length(k) + 2) } END { print v }' "$run_env"; }
set_var() {
    local key="$1" value="$2"
    [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "not a variable name: '$key'"
    case "$secret_names" in *" $key "*) die "$key is a secret: put it in the Secret qlora-job-secrets, not in $3" ;; esac
    case "$key" in *SECRET*|*TOKEN*|*PASSWORD*|*CREDENTIAL*)
        die "$key looks like a secret: put it in the Secret qlora-job-secrets, not in $3" ;;
    esac
    awk -v k="$key" 'index($0, k "=") != 1' "$run_env" > "$run_env.new"
    mv "$run_env.new" "$run_env"
    printf '%s=%s\n' "$key" "$value" >> "$run_env"
}

lineno=0
while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    line="${line%$'\r'}"
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    # docker passes a bare NAME through from the caller's environment; kustomize would do the same, so a secret
    # of the CI runner could end up in the ConfigMap: refuse.
    [[ "$line" == *=* ]] || die "$env_file:$lineno: '$line' has no '=': give a value (secrets go in the Secret)"
    set_var "${line%%=*}" "${line#*=}" "the env file"
done < "$env_file"
for kv in "${overrides[@]+"${overrides[@]}"}"; do
    [ "${kv%%=*}" != JOB_RUN_ID ] || die "the run id is the Job's name: use --suffix instead of JOB_RUN_ID"
    set_var "${kv%%=*}" "${kv#*=}" "the command line"
done
if [ -n "$(get_var JOB_RUN_ID)" ]; then
    note "ignoring JOB_RUN_ID=$(get_var JOB_RUN_ID) of $env_file: on Kubernetes the run id is the Job's name"
    awk 'index($0, "JOB_RUN_ID=") != 1' "$run_env" > "$run_env.new" && mv "$run_env.new" "$run_env"
fi

stage="$(get_var JOB_STAGE)"
case "$stage" in sft|dpo) ;; *) die "JOB_STAGE must be sft or dpo (got '$stage')" ;; esac
output="$(get_var JOB_OUTPUT)"
[ -n "$output" ] || die "JOB_OUTPUT is not set"
if [ -n "$sft_run" ]; then
    [[ "$sft_run" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "not a run id: '$sft_run'"
    for kv in "${overrides[@]+"${overrides[@]}"}"; do
        [ "${kv%%=*}" != JOB_ADAPTER ] || die "give --sft-run or JOB_ADAPTER=, not both"
    done
    set_var JOB_ADAPTER "${output%/}/$sft_run/adapter/" "--sft-run"
fi

# --- the kustomization --------------------------------------------------------------------------------------------
relpath() {  # relative path from $tmp to directory $1
    if realpath --relative-to=/ / >/dev/null 2>&1; then
        realpath --relative-to="$tmp" "$1"
    else
        python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$1" "$tmp"
    fi
}
overlay="${overlay:-$stage}"
if [ -f "$here/overlays/$overlay/kustomization.yaml" ]; then
    overlay_dir="../overlays/$overlay"
elif [ -f "$overlay/kustomization.yaml" ]; then
    overlay_dir="$(relpath "$overlay")"
else
    die "no overlay '$overlay': one of $(cd "$here/overlays" && echo *), or a directory with a kustomization.yaml"
fi
if [ -z "$suffix" ]; then
    suffix="$(date -u +%Y%m%d-%H%M%S)-$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')"
fi
[[ "$suffix" =~ ^[a-z0-9]([a-z0-9-]*[a-z0-9])?$ ]] || die "--suffix: lowercase letters, digits and '-' only"

{
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources:"
    echo "- $overlay_dir"
    if [ ${#components[@]} -gt 0 ]; then
        echo "components:"
        for c in "${components[@]}"; do
            [ -f "$here/components/$c/kustomization.yaml" ] \
                || die "no component '$c': one of $(cd "$here/components" && echo *)"
            echo "- ../components/$c"
        done
    fi
    echo "nameSuffix: -$suffix"
    # A TrainJob's runtime must exist before it (Trainer's webhook checks); kustomize sorts only at the top level.
    echo "sortOptions:"
    echo "  order: legacy"
    echo "  legacySortOptions:"
    echo "    orderFirst: [ConfigMap, TrainingRuntime]"
    echo "    orderLast: [TrainJob]"
    [ -z "$namespace" ] || echo "namespace: $namespace"
    echo "configMapGenerator:"
    echo "- name: qlora-job-config"
    echo "  behavior: replace"
    echo "  envs:"
    echo "  - run.env"
    echo "labels:"
    echo "- pairs:"
    echo "    qlora-job/stage: $stage"
    echo "  includeTemplates: true"
    if [ -n "$image" ]; then
        echo "images:"
        echo "- name: $placeholder_image"
        if [[ "$image" == *@* ]]; then
            echo "  newName: ${image%%@*}"
            echo "  digest: ${image#*@}"
        elif [[ "${image##*/}" == *:* ]]; then
            echo "  newName: ${image%:*}"
            echo "  newTag: \"${image##*:}\""
        else
            echo "  newName: $image"
            echo "  newTag: latest"
        fi
    fi
    echo "patches:"
    # The labels transformer does not know where a JobSet or a TrainingRuntime keeps its pod template.
    echo "- target:"
    echo "    kind: JobSet"
    echo "  patch: |-"
    echo "    - op: add"
    echo "      path: /spec/replicatedJobs/0/template/spec/template/metadata/labels/qlora-job~1stage"
    echo "      value: $stage"
    echo "- target:"
    echo "    kind: TrainingRuntime"
    echo "  patch: |-"
    echo "    - op: add"
    echo "      path: /spec/template/spec/replicatedJobs/0/template/spec/template/metadata/labels/qlora-job~1stage"
    echo "      value: $stage"
    if [ -n "$queue" ]; then
        [[ "$queue" =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ ]] || die "--queue: not a LocalQueue name: '$queue'"
        for kind in Job JobSet TrainJob; do
            echo "- target:"
            echo "    kind: $kind"
            echo "  patch: |-"
            echo "    - op: add"
            echo "      path: /metadata/labels/kueue.x-k8s.io~1queue-name"
            echo "      value: $queue"
        done
    fi
} > "$tmp/kustomization.yaml"

rendered="$tmp/rendered.yaml"
"$KUBECTL" kustomize --load-restrictor LoadRestrictionsNone "$tmp" > "$rendered" \
    || die "kustomize failed for overlay '$overlay'"

# kind and name of the workload (Job, JobSet or TrainJob) and the names of the ConfigMaps (and the TrainingRuntime) it
# uses
manifest_names() {
    awk -v want="$1" '
        /^---/ { kind = ""; inmeta = 0; next }
        /^kind: / { kind = $2 }
        /^metadata:/ { inmeta = 1; next }
        /^[^ ]/ { inmeta = 0 }
        inmeta && /^  name: / && kind ~ want { print kind, $2; inmeta = 0 }
    ' "$rendered"
}
read -r kind name < <(manifest_names '^(Job|JobSet|TrainJob)$') || die "overlay '$overlay' has no Job, JobSet or TrainJob"
configmaps="$(manifest_names '^ConfigMap$' | awk '{ print $2 }')"
runtimes="$(manifest_names '^TrainingRuntime$' | awk '{ print $2 }')"
case "$kind" in
    Job) resource="job.batch"; api_version="batch/v1"; pod_label="batch.kubernetes.io/job-name" ;;
    JobSet) resource="jobset.jobset.x-k8s.io"; api_version="jobset.x-k8s.io/v1alpha2"
            pod_label="jobset.sigs.k8s.io/jobset-name" ;;
    # Trainer runs a TrainJob as a JobSet of the same name.
    TrainJob) resource="trainjob.trainer.kubeflow.org"; api_version="trainer.kubeflow.org/v1alpha1"
              pod_label="jobset.sigs.k8s.io/jobset-name" ;;
esac
if [ -z "$image" ] || [[ "$image" == "$placeholder_image"* ]]; then
    [ "$dry_run" = 1 ] || die "give the image: k8s/submit.sh ENV_FILE IMAGE (or set QLORA_IMAGE)"
    note "no image given: the manifests keep the placeholder $placeholder_image"
fi

ns_args=()
[ -z "$namespace" ] || ns_args=(--namespace "$namespace")
run_ids="$name"
if [ "$overlay" = sweep ]; then run_ids="$name-<index>"; fi

if [ "$dry_run" = 1 ]; then
    cat "$rendered"
    note "dry run: would run: $KUBECTL create${namespace:+ --namespace $namespace} -f - (the manifests above)"
    note "dry run: $kind $name, run id $run_ids, outputs under ${output%/}/$run_ids/"
    exit 0
fi

if [ "$server_dry_run" = 1 ]; then
    "$KUBECTL" create "${ns_args[@]+"${ns_args[@]}"}" --dry-run=server -f "$rendered"
    exit 0
fi

case " ${components[*]+"${components[*]}"} " in
    *" workload-identity "*) ;;
    *) "$KUBECTL" get "${ns_args[@]+"${ns_args[@]}"}" secret qlora-job-secrets >/dev/null 2>&1 \
        || note "warning: no Secret qlora-job-secrets here (HF_TOKEN, AWS keys); the run gets no credentials" ;;
esac

# `create`, not `apply`: a name that exists already is an error, never a silent reuse of another run's id.
"$KUBECTL" create "${ns_args[@]+"${ns_args[@]}"}" -f "$rendered" >&2  # stdout: only the run id

# The ConfigMaps (and a TrainJob's runtime) belong to this run: let the garbage collector delete them with the Job
# (ttlSecondsAfterFinished; a TrainJob when you delete it).
uid="$("$KUBECTL" get "${ns_args[@]+"${ns_args[@]}"}" "$resource/$name" -o jsonpath='{.metadata.uid}')" || uid=""
if [ -n "$uid" ]; then
    owner="{\"metadata\":{\"ownerReferences\":[{\"apiVersion\":\"$api_version\",\"kind\":\"$kind\",\"name\":\"$name\",\"uid\":\"$uid\"}]}}"
    for cm in $configmaps; do
        "$KUBECTL" patch "${ns_args[@]+"${ns_args[@]}"}" configmap "$cm" --type=merge -p "$owner" >/dev/null \
            || note "warning: could not make $kind $name the owner of ConfigMap $cm (delete it yourself later)"
    done
    for rt in $runtimes; do
        "$KUBECTL" patch "${ns_args[@]+"${ns_args[@]}"}" trainingruntime.trainer.kubeflow.org "$rt" --type=merge \
            -p "$owner" >/dev/null \
            || note "warning: could not make $kind $name the owner of TrainingRuntime $rt (delete it yourself later)"
    done
fi

kc="$KUBECTL${namespace:+ -n $namespace}"
cat >&2 <<EOF
submit.sh: submitted $kind $name
  run id:   $run_ids
  outputs:  ${output%/}/$run_ids/
  watch:    $kc get $resource $name -w
            $kc get pods -l $pod_label=$name
            $kc logs -f -l $pod_label=$name --max-log-requests 16
EOF
if [ "$kind" = TrainJob ]; then
    echo "  progress: $kc get $resource $name -o jsonpath='{.status.trainerStatus}'" >&2
fi
if [ "$stage" = sft ] && [ "$overlay" != sweep ]; then
    echo "  then DPO: k8s/submit.sh --sft-run $name docker/dpo.env ${image:-IMAGE}" >&2
fi
echo "$name"

[ "$wait" = 1 ] || exit 0

# --- wait for the outcome -----------------------------------------------------------------------------------------
case "$kind" in Job | TrainJob) done_type=Complete ;; JobSet) done_type=Completed ;; esac
poll="${QLORA_POLL_SECONDS:-30}"
start=$SECONDS
while :; do
    conditions="$("$KUBECTL" get "${ns_args[@]+"${ns_args[@]}"}" "$resource/$name" \
        -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}')" || conditions=""
    case " $conditions " in
        *" $done_type "*)
            note "$kind $name succeeded: outputs under ${output%/}/$run_ids/"
            exit 0 ;;
        *" Failed "*)
            why="$("$KUBECTL" get "${ns_args[@]+"${ns_args[@]}"}" "$resource/$name" \
                -o jsonpath='{.status.conditions[?(@.type=="Failed")].reason}: {.status.conditions[?(@.type=="Failed")].message}')" || why=""
            note "$kind $name failed: $why"
            "$KUBECTL" get "${ns_args[@]+"${ns_args[@]}"}" pods -l "$pod_label=$name" \
                -o 'custom-columns=POD:.metadata.name,PHASE:.status.phase,EXIT:.status.containerStatuses[*].state.terminated.exitCode,REASON:.status.containerStatuses[*].state.terminated.reason' >&2 || true
            exit 1 ;;
    esac
    if [ "$wait_timeout" -gt 0 ] && [ $((SECONDS - start)) -ge "$wait_timeout" ]; then
        note "gave up waiting after ${wait_timeout}s; $kind $name is still running"
        exit 124
    fi
    sleep "$poll"
done
