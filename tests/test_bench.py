"""bench/bench.py, run as a user runs it (tiny shape, a few steps, on the CPU): what a bench user relies on is a
zero exit, one JSON file with the environment (commit, command, versions), a run per seed recipe and job variant
with its rates, the job/seed ratios, and `report` turning that file into bench/results/RESULTS.md's markdown."""

import json
import subprocess
import sys

from conftest import ROOT, job_env

ARGS = ["--shape", "tiny", "--parts", "sft,dpo", "--seed-steps", "1", "--job-steps", "2", "--dpo-seed-steps", "1",
        "--dpo-job-steps", "2", "--sft-variants", "default,unsorted@2", "--dpo-variants", "default,unsorted",
        "--sft-examples", "8", "--dpo-pairs", "8", "--tag", "t"]


def bench(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/bench.py", *args], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_bench_runs_seed_and_job_variants_and_reports_them(tmp_path):
    # BENCH_COMMIT: the commit of a copied tree whose .git is missing or stale (a GPU machine's), named by the caller.
    env = job_env(BENCH_COMMIT="abc1234")
    r = bench(env, "run", *ARGS, "--work", str(tmp_path), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    path = tmp_path / "out" / "bench-tiny-t.json"
    res = json.loads(path.read_text())

    e = res["environment"]
    assert e["git_commit"] == "abc1234" and e["command"].startswith("python bench/bench.py run --shape tiny")
    assert all(e[p] for p in ("torch", "transformers", "trl"))

    runs = res["runs"]
    assert not [x for x in runs if "error" in x], [x["error"] for x in runs if "error" in x]
    assert sorted((x["who"], x["stage"], x["name"]) for x in runs) == [
        ("job", "dpo", "default"), ("job", "dpo", "unsorted"), ("job", "sft", "default"), ("job", "sft", "unsorted"),
        ("seed", "dpo", "seed"), ("seed", "sft", "seed")]
    for x in runs:
        assert x["tokens_per_second"] > 0, x
        assert x["stage"] == "sft" or x["pairs_per_second"] > 0, x
        assert x["who"] == "seed" or x["steps"] == 2, x
    assert {"sft:default/seed:tokens_per_second", "sft:unsorted/seed:tokens_per_second",
            "dpo:default/seed:pairs_per_second", "dpo:unsorted/seed:pairs_per_second"} <= set(res["ratios"])

    rep = bench(env, "report", str(path))
    assert rep.returncode == 0, rep.stderr[-3000:]
    md = rep.stdout
    for s in ("seed recipe", "job default", "job unsorted", "commit abc1234"):
        assert s in md, md
    assert any(line.startswith("| run | stage |") for line in md.splitlines()), md
