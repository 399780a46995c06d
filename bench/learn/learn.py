"""Does the pipeline teach? SFT on made-up facts (code -> invented word) through `python -m job`, then DPO on top of
the SFT adapter with pairs whose chosen answer ends with a period and whose rejected one does not; scored from the
runs' own generations.jsonl and metrics.json.

    python bench/learn/learn.py --shape 1.8b --facts 256 --device cuda --out results/   # the GPU run (bench/learn/run.sh)

Each comma-separated learning rate is one run, all of a stage's runs at once (one GPU holds several 4-bit 1.8B
runs, and short rows leave it underused); DPO starts from the SFT run with the most exact answers. Everything is
reported, every run. Writes into --out: learn.json (environment, settings, figures of every run), {sft,dpo}-
generations.md and -loss.png of the best runs, runs.tar.gz (every run's files but the adapter weights, and logs).

The CPU tests (tests/test_learning.py) call the same functions on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "bench"))

import facts as F  # noqa: E402

#: tests/test_learning.py's model: two layers of 128 (its docstring says why the init is 0.125).
CPU_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 initializer_range=0.125)


def prepare(work: Path, n_facts: int, shape: dict, *, vocab_size: int | None = None, device: str = "cpu",
            dtype: str = "float32", seed: int = 0) -> dict:
    """The facts, their SFT file and DPO pairs file, and a random-weight model whose tokenizer knows their words."""
    facts = F.make_facts(n_facts, seed=seed)
    model = work / "model"
    if not (model / "config.json").exists():
        F.build_model(model, F.texts(facts), shape, vocab_size=vocab_size, device=device, dtype=dtype, seed=seed)
    return {"facts": facts, "model": model,
            "sft": F.write_jsonl(work / "data" / "sft.jsonl", F.sft_records(facts)),
            "dpo": F.write_jsonl(work / "data" / "dpo.jsonl", F.dpo_records(facts))}


def start_job(env: dict, log: Path) -> subprocess.Popen:
    f = open(log, "w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "job"], env=env, stdout=f, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    proc.started = time.monotonic()
    return proc


def wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, dict]:
    """Wait for concurrent runs until `deadline` (time.monotonic()); a run still going then is stopped (SIGTERM: it
    uploads a checkpoint and exits 143) and counted as not finished."""
    out = {}
    for name, proc in procs.items():
        try:
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            proc.terminate()
            rc = proc.wait(timeout=60)
        out[name] = {"exit_code": rc, "wall_s": round(time.monotonic() - proc.started, 1)}
    return out


def sft_env(base: dict, p: dict, out: Path, run_id: str = "sft", **settings: str) -> dict:
    """SFT on every fact; the prompts answered before and after are all the facts (references: their SFT answers)."""
    return {**base, "JOB_STAGE": "sft", "JOB_BASE_MODEL": str(p["model"]), "JOB_DATA": str(p["sft"]),
            "JOB_EVAL_PROMPTS": str(p["sft"]), "JOB_OUTPUT": str(out), "JOB_RUN_ID": run_id, **settings}


def dpo_env(base: dict, p: dict, out: Path, adapter: Path, run_id: str = "dpo", **settings: str) -> dict:
    """DPO on the SFT adapter, a quarter of the pairs held out for the reward accuracy; the prompts answered before
    (by the SFT adapter) and after are all the facts (references: the chosen answers)."""
    return {**base, "JOB_STAGE": "dpo", "JOB_BASE_MODEL": str(p["model"]), "JOB_DATA": str(p["dpo"]),
            "JOB_ADAPTER": str(adapter), "JOB_EVAL_FRACTION": "0.25", "JOB_EVAL_PROMPTS": str(p["dpo"]),
            "JOB_OUTPUT": str(out), "JOB_RUN_ID": run_id, **settings}


def score(run_dir: Path) -> dict:
    """The figures a reader checks, from the files the run uploaded."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    gens = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
    n = len(gens)
    out = {"prompts": n}
    for side in ("before", "after"):
        out[f"exact_match_{side}"] = round(sum(bool(g[f"{side}_exact_match"]) for g in gens) / n, 4)
        out[f"stopped_at_eos_{side}"] = round(sum(g[f"{side}_stopped_at_eos"] for g in gens) / n, 4)
    out["exact_and_stopped_after"] = round(sum(bool(g["after_exact_match"]) and g["after_stopped_at_eos"] for g in gens) / n, 4)
    out["ends_with_rule_suffix_before"] = round(sum((g["before"] or "").endswith(F.RULE_SUFFIX) for g in gens) / n, 4)
    out["ends_with_rule_suffix_after"] = round(sum((g["after"] or "").endswith(F.RULE_SUFFIX) for g in gens) / n, 4)
    keep = ("steps", "epochs", "train_loss", "train_loss_last", "eval_loss", "eval_mean_token_accuracy", "reward_accuracy",
            "eval_reward_accuracy", "eval_reward_margin", "eval_logps_chosen", "eval_logps_rejected", "train_runtime_s",
            "tokens_per_second", "peak_gpu_memory_gib")
    out.update({k: metrics[k] for k in keep if k in metrics})
    return out


def environment() -> dict:
    from importlib import metadata

    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
           "git_commit": os.environ.get("BENCH_COMMIT") or _git_commit()}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    import torch

    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
    return env


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    from synth import SHAPES, VOCAB_SIZE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.8b", choices=sorted([*SHAPES, "cpu"]), help="cpu: tests/test_learning.py's")
    ap.add_argument("--facts", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, default=Path("/tmp/learn"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sft-epochs", default="120")
    ap.add_argument("--sft-lr", default="5e-4,1e-3,2e-3", help="comma-separated: one concurrent SFT run each")
    ap.add_argument("--dpo-epochs", default="3")
    ap.add_argument("--dpo-lr", default=None, help="comma-separated: one concurrent DPO run each, on the best SFT run")
    ap.add_argument("--dpo-lr-scale", default="0.05,0.15,0.5",
                    help="without --dpo-lr: these multiples of the best SFT run's learning rate")
    ap.add_argument("--max-new-tokens", default="16")
    ap.add_argument("--sft-deadline-s", type=float, default=340, help="stop SFT runs still going this long after the start")
    ap.add_argument("--deadline-s", type=float, default=480, help="stop DPO runs still going this long after the start")
    ap.add_argument("--set", action="append", default=[], metavar="JOB_X=V", help="any other JOB_ setting, for both stages")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:JOB_X=V,JOB_Y=W",
                    help="SFT runs of this LoRA variant (one per --sft-lr, run one after another), instead of the SFT+DPO plan")
    a = ap.parse_args(argv)

    t0 = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    p = prepare(a.work, a.facts, CPU_SHAPE if a.shape == "cpu" else SHAPES[a.shape],
                vocab_size=VOCAB_SIZE if a.shape not in ("tiny", "cpu") else None,
                device=a.device, dtype="bfloat16" if a.device == "cuda" else "float32")
    base = {k: v for k, v in os.environ.items() if not k.startswith("JOB_")}
    base.update({"JOB_LOG_FORMAT": "json", "JOB_EVAL_MAX_NEW_TOKENS": a.max_new_tokens, **dict(s.split("=", 1) for s in a.set)})
    runs, logs = a.work / "runs", a.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment(), "command": " ".join(["bench/learn/learn.py", *(argv if argv is not None else sys.argv[1:])]),
              "shape": a.shape, "facts": a.facts, "model_build_s": round(time.monotonic() - t0, 1), "example_fact": p["facts"][0],
              "sft_answers_with_period": sum(f["period"] for f in p["facts"]),
              "dpo_rule": f"chosen = the word + {F.RULE_SUFFIX!r}, rejected = the word alone"}

    def stage(name: str, lrs: str, epochs: str, deadline: float, env_for) -> str | None:
        procs = {}
        for lr in lrs.split(","):
            run_id = f"{name}-lr{lr}"
            env = env_for(run_id, JOB_WORKDIR=str(a.work / "job" / run_id), JOB_TRAIN__NUM_TRAIN_EPOCHS=epochs,
                          JOB_TRAIN__LEARNING_RATE=lr)
            procs[run_id] = start_job(env, logs / f"{run_id}.log")
            result.setdefault(name, {})[run_id] = {"settings": {k: v for k, v in env.items() if k.startswith("JOB_") and k != "JOB_WORKDIR"}}
        for run_id, status in wait_all(procs, deadline).items():
            result[name][run_id].update(status)
            if status["exit_code"] == 0:
                result[name][run_id].update(score(runs / run_id))
            else:
                print(f"{run_id}: exit {status['exit_code']}\n" + "".join((logs / f"{run_id}.log").read_text().splitlines(True)[-30:]),
                      file=sys.stderr)
        done = [r for r, v in result[name].items() if v["exit_code"] == 0]
        # The best run: most answers exact and stopped at EOS (DPO: in the chosen style); then the held-out reward accuracy.
        best = max(done, key=lambda r: (result[name][r]["exact_and_stopped_after"], result[name][r].get("eval_reward_accuracy") or 0), default=None)
        result[f"{name}_best"] = best
        if best:
            for f in ("generations.md", "loss.png"):
                (a.out / f"{name}-{f}").write_bytes((runs / best / f).read_bytes())
        return best

    if a.variant:
        return variants(a, p, base, runs, logs, result, t0)
    best_sft = stage("sft", a.sft_lr, a.sft_epochs, t0 + a.sft_deadline_s, lambda run_id, **s: sft_env(base, p, runs, run_id, **s))
    if best_sft:
        sft_lr = float(result["sft"][best_sft]["settings"]["JOB_TRAIN__LEARNING_RATE"])
        dpo_lrs = a.dpo_lr or ",".join(f"{float(x) * sft_lr:.3g}" for x in a.dpo_lr_scale.split(","))
        stage("dpo", dpo_lrs, a.dpo_epochs, t0 + a.deadline_s, lambda run_id, **s: dpo_env(base, p, runs, runs / best_sft / "adapter", run_id, **s))
    result["total_s"] = round(time.monotonic() - t0, 1)
    (a.out / "learn.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    import tarfile

    with tarfile.open(a.out / "runs.tar.gz", "w:gz") as tar:  # everything the runs wrote but the adapters' weights
        for f in sorted([*runs.rglob("*"), *logs.rglob("*")]):
            if f.is_file() and f.suffix != ".safetensors" and "checkpoints" not in f.parts:
                tar.add(f, arcname=str(f.relative_to(a.work)))
    print(json.dumps({k: result.get(k) for k in ("sft_best", "dpo_best", "total_s")}))
    for name in ("sft", "dpo"):
        for run_id, v in result.get(name, {}).items():
            print(run_id, {k: v.get(k) for k in ("exit_code", "wall_s", "steps", "exact_match_before", "exact_and_stopped_after",
                                                   "eval_reward_accuracy", "train_loss_last")})
    return 0 if result.get("dpo_best") else 1


def variants(a, p: dict, base: dict, runs: Path, logs: Path, result: dict, t0: float) -> int:
    """--variant: SFT of each LoRA variant at each --sft-lr, one run at a time (a CPU has no room for several), each
    scored like the plan's runs; learn.json holds every run under `variants`."""
    result["variants"] = {}
    for spec in a.variant:
        name, _, sets = spec.partition(":")
        extra = dict(kv.split("=", 1) for kv in sets.split(",") if kv)
        for lr in a.sft_lr.split(","):
            run_id = f"sft-{name}-lr{lr}"
            env = sft_env(base, p, runs, run_id, JOB_WORKDIR=str(a.work / "job" / run_id), JOB_TRAIN__NUM_TRAIN_EPOCHS=a.sft_epochs,
                          JOB_TRAIN__LEARNING_RATE=lr, **extra)
            status = wait_all({run_id: start_job(env, logs / f"{run_id}.log")}, time.monotonic() + a.sft_deadline_s)[run_id]
            row = {"variant": name, "settings": {k: v for k, v in env.items() if k.startswith("JOB_") and k != "JOB_WORKDIR"}, **status}
            if status["exit_code"] == 0:
                row.update(score(runs / run_id))
            result["variants"][run_id] = row
            print(run_id, {k: row.get(k) for k in ("exit_code", "wall_s", "steps", "exact_and_stopped_after", "train_loss_last")},
                  flush=True)
    result["total_s"] = round(time.monotonic() - t0, 1)
    (a.out / "learn.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0 if all(r["exit_code"] == 0 for r in result["variants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
