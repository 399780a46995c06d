# syntax=docker/dockerfile:1
# The qlora-job image: one SFT or DPO stage per run, configured by JOB_* variables (docs/container.md).
#   docker build -t qlora-job .           (labels and a pinned base for releases: docs/container.md)
#   docker run --rm --gpus all --env-file docker/sft.env -e HF_TOKEN -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY qlora-job
#
# Base: Debian's slim Python, not nvidia/cuda. PyPI's torch requires the CUDA libraries as pip packages (nvidia-*,
# cuda-toolkit: with torch and triton 4.8 GB installed), and loads those, so a CUDA base image would only add a
# second, unused copy. The driver comes from the host (NVIDIA container toolkit, `--gpus`). Unlike nvidia/cuda, the
# image does not set NVIDIA_VISIBLE_DEVICES=all: it sees only the GPUs it was given (--gpus, a Kubernetes request).
# Release builds pin the digest: --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: the Python environment, in three directories that become three layers of the final image ----------
FROM ${BASE_IMAGE} AS build
# CI only: a directory of wheels, bind-mounted into the build, that replaces PyPI; its torch is a CPU wheel and
# the CUDA-only packages are left out. Production builds leave it empty and install the hashed locks from PyPI.
ARG WHEELS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
RUN python3 -m venv /opt/venv
COPY docker/requirements-cuda.lock docker/requirements.lock /tmp/lock/
# torch, triton, liger-kernel and the CUDA wheels go to their own directory, so they are a layer of their own
# (most of the image) that a change to any other dependency leaves as it is: users pull it once per torch release.
RUN if [ -z "$WHEELS" ]; then \
        /opt/venv/bin/pip install --no-deps --require-hashes --target /opt/torch -r /tmp/lock/requirements-cuda.lock; \
    else \
        /opt/venv/bin/pip install --no-deps --no-index --find-links "$WHEELS" --target /opt/torch \
            "$(grep -o '^torch==[^ ]*' /tmp/lock/requirements-cuda.lock)"; \
    fi
RUN if [ -n "$WHEELS" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS"; fi \
 && /opt/venv/bin/pip install --no-deps --require-hashes -r /tmp/lock/requirements.lock \
 && printf '%s\n' /opt/torch /opt/app \
    > "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/qlora-job.pth"
# The code last: a change to it rebuilds only this small layer.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY job/ job/
RUN /opt/venv/bin/pip install --no-deps --no-index --no-build-isolation --target /opt/app . \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --yes pip

# ---- the image ----------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
# tini as PID 1: forwards SIGTERM to the job (which then checkpoints and exits 143) and reaps orphans.
# gcc and libc headers: Triton compiles a small launcher with the system C compiler the first time a kernel runs
# (Liger's fused kernels, on by default on GPUs). The distribution is pinned by the base image's tag or digest.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini gcc libc6-dev \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 qlora \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin qlora \
 && mkdir -p /work /cache/huggingface \
 && chown 10001:10001 /work /cache/huggingface \
 && chmod 1777 /work /cache/huggingface

COPY --from=build /opt/torch /opt/torch
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/app /opt/app
COPY entrypoint.sh docker/launch.py docker/gpus.py /opt/qlora-job/

# The root filesystem can be read-only: everything is written to /tmp (HOME too: Triton's compiled kernels, which
# are loaded from there, so /tmp must not be noexec), /work (the job's scratch: downloads, checkpoints) or
# /cache/huggingface (HF_HOME: mount a volume there to keep it across runs). Like /tmp, the three are writable by
# any uid, so `--user "$(id -u):$(id -g)"` works too (to share a host's Hugging Face cache, say).
ENV PATH=/opt/venv/bin:/opt/app/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    JOB_WORKDIR=/work \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1
VOLUME ["/tmp", "/work", "/cache/huggingface"]
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/qlora-job/entrypoint.sh"]

# Last, so that a new revision changes no layer above.
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="qlora-job" \
      org.opencontainers.image.description="Fine-tunes open LLMs with 4-bit QLoRA (TRL SFT or DPO), configured by JOB_* environment variables" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}"
