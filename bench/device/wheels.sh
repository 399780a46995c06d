#!/usr/bin/env bash
# Build .gpuw/ in the project root: the Python packages the GPU machine's image lacks, as wheels for its Python (3.12,
# x86-64), in three sets that together stay under the device call's 64 MiB carry limit, so that the job AND its
# Unsloth peer run in ONE call:
#   .gpuw/common   bitsandbytes (slimmed to its CUDA 13.0 and CPU libraries), pydantic, dill, multiprocess, ...
#   .gpuw/job      what the job needs beyond the image: transformers 5.24, TRL 1.16, datasets 5, liger-kernel, ...
#                  (no boto3: the benchmark reads and writes local paths only)
#   .gpuw/unsloth  Unsloth 2026.10.9 and its pins (TRL 1.15, datasets < 5; the image's transformers 5.17), with the
#                  unsloth wheel stripped of `studio/` and `unsloth_cli/` (26 MB of web UI and CLI that
#                  `import unsloth` never loads). Unsloth needs its own environment: never on the job's PYTHONPATH.
# The lists are ../shared/gpu/wheels.sh's and ../shared/gpu/peers.sh's (Unsloth measured that way on the H200).
#   usage: bench/device/wheels.sh          then carry [".gpuw"]; bench/device/run.sh (through common.sh) installs them
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
git check-ignore -q .gpuw/ || { echo ".gpuw must be ignored by git (.gitignore has /.gpuw/)"; exit 1; }
rm -rf .gpuw && mkdir -p .gpuw/common .gpuw/job .gpuw/unsloth
get() {  # get DIR PACKAGE...
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$dir" "$@"
}
get .gpuw/common bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection annotated-types dill \
  multiprocess
get .gpuw/job transformers==5.24.0 trl==1.16.0 "datasets>=5.2,<6" liger-kernel pydantic-settings python-dotenv
get .gpuw/unsloth unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 "datasets<5" tyro torchao cut_cross_entropy \
  msgspec hf_transfer docstring-parser shtab typeguard diffusers xxhash
python3 - <<'PY'
"""Slim two wheels: bitsandbytes to its CUDA 13.0 and CPU libraries (the image's torch is built for CUDA 13.0),
unsloth without studio/ and unsloth_cli/; RECORD rewritten so that pip accepts them."""
import base64, glob, hashlib, os, re, shutil, tempfile, zipfile

def rewrite(whl, drop):
    tmp = tempfile.mkdtemp()
    with zipfile.ZipFile(whl) as z:
        z.extractall(tmp)
    for root, dirs, files in os.walk(tmp, topdown=True):
        rel_root = os.path.relpath(root, tmp)
        for d in list(dirs):
            if drop(os.path.normpath(os.path.join(rel_root, d)) + "/"):
                shutil.rmtree(os.path.join(root, d)); dirs.remove(d)
        for f in files:
            if drop(os.path.normpath(os.path.join(rel_root, f))):
                os.remove(os.path.join(root, f))
    info = next(d for d in os.listdir(tmp) if d.endswith(".dist-info"))
    rows = []
    for root, _, files in os.walk(tmp):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), tmp)
            if rel == f"{info}/RECORD":
                continue
            data = open(os.path.join(root, f), "rb").read()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{rel},sha256={digest},{len(data)}")
    rows.append(f"{info}/RECORD,,")
    open(os.path.join(tmp, info, "RECORD"), "w").write("\n".join(rows) + "\n")
    top_level = os.path.join(tmp, info, "top_level.txt")
    if os.path.exists(top_level):
        names = [n for n in open(top_level).read().split() if os.path.exists(os.path.join(tmp, n))]
        open(top_level, "w").write("\n".join(names) + "\n")
    os.remove(whl)
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        for root, _, files in os.walk(tmp):
            for f in files:
                p = os.path.join(root, f)
                z.write(p, os.path.relpath(p, tmp))
    shutil.rmtree(tmp)

for whl in glob.glob(".gpuw/common/bitsandbytes-*.whl"):
    rewrite(whl, lambda rel: bool(re.match(r"bitsandbytes/libbitsandbytes_.*\.so$", rel)) and not re.search(r"_(cuda130|cpu)\.so$", rel))
for whl in glob.glob(".gpuw/unsloth/unsloth-*.whl"):
    rewrite(whl, lambda rel: rel.startswith(("studio/", "unsloth_cli/")))
PY
python3 - <<'PY'
"""Warn about a dependency in pyproject.toml that neither the GPU image (its package list, as KINDS.md gave it in
2026-11) nor .gpuw/ has: `import job` may need it on the device."""
import glob, os, re, tomllib
image = {"accelerate", "huggingface-hub", "peft", "safetensors", "tokenizers", "tqdm", "pyarrow", "torch", "numpy", "pandas",
         "requests", "pyyaml", "packaging", "filelock", "fsspec", "xxhash", "triton", "jinja2", "psutil", "rich", "pytest"}
lazy = {"boto3"}  # imported only for s3:// paths, which the benchmark does not use
have = {re.split(r"-\d", os.path.basename(w))[0].lower().replace("_", "-") for w in glob.glob(".gpuw/*/*.whl")}
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
names = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
missing = sorted(names - image - have - lazy)
print("wheels: every dependency is in the image or .gpuw/" if not missing else f"wheels: WARNING not carried and not in the image: {missing}")
PY
du -sh .gpuw/* .gpuw
total=$(du -sbc .gpuw | tail -1 | cut -f1)
[ "$total" -lt $((60 * 1024 * 1024)) ] || { echo "wheels: $total bytes, too close to the 64 MiB carry limit"; exit 1; }
echo 'carry [".gpuw"]; bench/device/run.sh (common.sh) installs .gpuw/common+job into /tmp/site and .gpuw/common+unsloth into /tmp/usite'
