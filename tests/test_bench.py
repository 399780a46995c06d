"""bench/bench.py, run as a user runs it (tiny shape, a few steps, on the CPU): what a bench user relies on is a
zero exit, one JSON file with the environment (commit, command, versions), a run per seed recipe, job variant and peer
(stock TRL; Unsloth in a process and environment of its own, here a stand-in since Unsloth needs a GPU) with its
rates, `report` turning that file into bench/results/RESULTS.md's markdown, and `headline` into headline.json, where a
run that did not happen says why instead of showing a number."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT, job_env

sys.path.insert(0, str(ROOT / "bench"))
import bench as bench_module  # noqa: E402

PLAN = ("sft:seed:seed@1,sft:job:default@2,sft:job:sdpa@2,sft:trl:trl_best@2,sft:unsloth:unsloth_lowmem+unsloth@2,"
        "dpo:seed:seed@1,dpo:job:default@2,dpo:unsloth:unsloth@2,sft+dpo:unsloth:unsloth@2")
ARGS = ["--shape", "tiny", "--sft-examples", "8", "--dpo-pairs", "4", "--warmup-steps", "1", "--tag", "t"]


def bench(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/bench.py", *args], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_bench_runs_seed_job_and_peers_and_reports_them(tmp_path):
    # BENCH_COMMIT: the commit of a copied tree whose .git is missing or stale (a GPU machine's), named by the caller.
    env = job_env(BENCH_COMMIT="abc1234", BENCH_UNSLOTH_PYTHONPATH=str(ROOT / "tests" / "fake_unsloth"))
    r = bench(env, "run", *ARGS, "--plan", PLAN, "--work", str(tmp_path), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    path = tmp_path / "out" / "bench-tiny-t.json"
    res = json.loads(path.read_text())

    e = res["environment"]
    assert e["git_commit"] == "abc1234" and e["command"].startswith("python bench/bench.py run --shape tiny")
    assert all(e[p] for p in ("torch", "transformers", "trl"))

    runs = res["runs"]
    assert not [x for x in runs if x.get("error") or x.get("skipped")], [x.get("error") or x.get("skipped") for x in runs]
    assert [(x["who"], x["stage"], x["name"]) for x in runs] == [  # in the plan's order
        ("seed", "sft", "seed"), ("job", "sft", "default"), ("job", "sft", "sdpa"), ("trl", "sft", "trl_best"),
        ("unsloth", "sft", "unsloth_lowmem"), ("unsloth", "sft", "unsloth"), ("seed", "dpo", "seed"), ("job", "dpo", "default"),
        ("unsloth", "dpo", "unsloth"), ("unsloth", "sft", "unsloth"), ("unsloth", "dpo", "unsloth")]
    # sft+dpo: both stages in one process (Unsloth imported once), each as the stage alone measured it
    both = runs[-2:]
    assert both[0]["process_wall_s"] == both[1]["process_wall_s"] and both[0]["versions"] == both[1]["versions"]
    assert [x["layout"] for x in both] == [runs[5]["layout"], runs[-3]["layout"]] and both[1]["pairs"] == 4
    assert both[1]["tokens"] == runs[-3]["tokens"] and both[0]["tokens"] == runs[5]["tokens"]
    by = {(x["who"], x["stage"], x["name"]): x for x in runs}  # the later run of a name (the headline's)
    for x in runs:
        assert x["tokens_per_second"] > 0, x
        assert x["stage"] == "sft" or x["pairs_per_second"] > 0, x
        assert x["who"] == "seed" or x["steps"] == 2, x
        assert x["who"] == "seed" or x["steady_tokens_per_second"] > 0, x  # steps after --warmup-steps
    # The lever's switch and the peers' settings are what they say
    assert by[("job", "sft", "default")]["attn_implementation"] == "packed_varlen"
    assert by[("job", "sft", "sdpa")]["attn_implementation"] == "sdpa"
    assert by[("trl", "sft", "trl_best")]["gradient_checkpointing"] is False
    assert by[("unsloth", "sft", "unsloth_lowmem")]["gradient_checkpointing"] is True
    assert by[("unsloth", "sft", "unsloth")]["gradient_checkpointing"] is False
    assert by[("unsloth", "dpo", "unsloth")]["pairs"] == 4 and by[("unsloth", "dpo", "unsloth")]["layout"]["max_length"] == 1024
    # Same data: every SFT run of two full passes over the 8 examples trained on the same tokens as the job
    assert {x["tokens"] for x in runs if x["stage"] == "sft" and x["who"] != "seed"} == {by[("job", "sft", "default")]["tokens"]}
    assert {"sft:default/seed:tokens_per_second", "dpo:default/seed:pairs_per_second"} <= set(res["ratios"])

    rep = bench(env, "report", str(path))
    assert rep.returncode == 0, rep.stderr[-3000:]
    md = rep.stdout
    for s in ("seed recipe", "job default", "job sdpa", "trl trl_best", "unsloth unsloth_lowmem", "commit abc1234"):
        assert s in md, md
    assert any(line.startswith("| run | stage |") for line in md.splitlines()), md

    head = bench(env, "headline", str(path), "--out", str(tmp_path / "headline.json"))
    assert head.returncode == 0, head.stderr[-3000:]
    h = json.loads((tmp_path / "headline.json").read_text())
    assert h["commit"] == "abc1234" and h["versions"]["trl"] and h["date"]
    sft, dpo = h["sft_tiny"], h["dpo_tiny"]
    assert set(sft) == set(dpo) == {"job", "job_lowmem", "seed", "trl_best", "unsloth", "unsloth_lowmem"}
    assert sft["job"]["tokens_per_s"] == by[("job", "sft", "default")]["tokens_per_second"]
    assert sft["unsloth"]["steady_tokens_per_s"] == by[("unsloth", "sft", "unsloth")]["steady_tokens_per_second"]
    assert dpo["job"]["pairs_per_s"] == by[("job", "dpo", "default")]["pairs_per_second"] and "pairs_per_s" not in sft["job"]
    assert dpo["unsloth"]["steady_pairs_per_s"] == by[("unsloth", "dpo", "unsloth")]["steady_pairs_per_second"]
    assert "not measured" in sft["job_lowmem"]["skipped"] and "not measured" in dpo["trl_best"]["skipped"]
    assert h["e2e_seconds"] is None and h["goals"]["seed workload end to end, s"]["met"] is None
    assert h["goals"]["sft steady vs trl_best"]["measured"] == round(
        sft["job"]["steady_tokens_per_s"] / sft["trl_best"]["steady_tokens_per_s"], 3)


def test_runs_past_the_deadline_are_recorded_as_skipped(tmp_path):
    """A device call has a hard time limit: what the bench could not start still appears, with the reason."""
    env = job_env(BENCH_COMMIT="abc1234")  # and no Unsloth environment
    r = bench(env, "run", *ARGS, "--plan", "sft:job:default@2,sft:unsloth:unsloth", "--deadline-s", "0",
              "--work", str(tmp_path), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads((tmp_path / "out" / "bench-tiny-t.json").read_text())
    assert [(x["who"], x["name"]) for x in res["runs"]] == [("job", "default"), ("unsloth", "unsloth")]
    assert all("deadline" in x["skipped"] for x in res["runs"])
    h = bench_module.headline([tmp_path / "out" / "bench-tiny-t.json"])
    assert "deadline" in h["sft_tiny"]["job"]["skipped"] and h["goals"]["sft steady tokens/s"]["met"] is None


def test_unsloth_without_its_environment_is_skipped_not_run_in_ours(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_UNSLOTH_PYTHONPATH", raising=False)
    runs = bench_module.run_unsloth({"work": tmp_path}, ["unsloth"], 2)
    assert runs == [{"name": "unsloth", "who": "unsloth", "stage": "sft",
                     "skipped": "Unsloth's environment not given (BENCH_UNSLOTH_PYTHONPATH)"}]


def test_the_parts_options_still_describe_the_same_runs():
    a = SimpleNamespace(parts="sft,dpo,e2e", seed_steps=12, seed_nogc_steps=0, dpo_seed_steps=8, sft_variants="default,lowmem@5",
                        dpo_variants="default", job_steps=10, dpo_job_steps=-1)
    assert bench_module.plan_from_parts(a) == [
        ("sft", "seed", ["seed"], 12), ("dpo", "seed", ["seed"], 8), ("sft", "job", ["default"], None),
        ("sft", "job", ["lowmem"], 5), ("dpo", "job", ["default"], None), ("sft+dpo", "e2e", ["e2e"], None)]
    assert bench_module.parse_plan("sft:job:default@8,sft:unsloth:unsloth_lowmem+unsloth,e2e,e2e_nogen") == [
        ("sft", "job", ["default"], 8), ("sft", "unsloth", ["unsloth_lowmem", "unsloth"], None), ("sft+dpo", "e2e", ["e2e"], None),
        ("sft+dpo", "e2e", ["e2e_nogen"], None)]
    assert bench_module.parse_plan("sft+dpo:unsloth:unsloth@5") == [("sft+dpo", "unsloth", ["unsloth"], 5)]
    with pytest.raises(SystemExit, match="sft\\+dpo:job:default"):  # one import to share: Unsloth's only
        bench_module.parse_plan("sft+dpo:job:default")


def test_headline_keeps_a_measurement_over_a_later_skip(tmp_path):
    def result(name, runs):
        path = tmp_path / name
        path.write_text(json.dumps({"shape": "13b", "environment": {"device": "NVIDIA H200", "git_commit": "abc1234"}, "runs": runs}))
        return path

    measured = {"who": "job", "stage": "dpo", "name": "default", "tokens_per_second": 10.0, "pairs_per_second": 4.0,
                "steady_pairs_per_second": 4.5, "peak_gpu_memory_gib": 60.0}
    first = result("bench-13b-run1.json", [measured])
    second = result("bench-13b-run2.json", [{"who": "job", "stage": "dpo", "name": "default", "skipped": "the bench's deadline"}])
    h = bench_module.headline([first, second])
    assert h["dpo_13b"]["job"]["steady_pairs_per_s"] == 4.5 and h["dpo_13b"]["job"]["source"] == "bench-13b-run1.json"
    assert h["goals"]["dpo steady pairs/s"] == {"target": ">= 6", "measured": 4.5, "met": False}
    assert "not measured" in h["dpo_13b"]["unsloth"]["skipped"]


def result_file(path, runs):
    path.write_text(json.dumps({"shape": "13b", "environment": {"device": "NVIDIA H100 80GB HBM3", "memory_free_gib": 22.5,
                                                                  "date": "2026-12-07", "git_commit": "abc1234"}, "runs": runs}))
    return path


def test_a_card_entry_compares_auto_with_the_fastest_job_variant_measured_beside_it(tmp_path):
    """headline.json `cards`: per stage the fastest job variant, `auto` (the `default` run) as a share of it, and the
    memory plan `auto` chose with its estimated peak; a failed variant (out of memory) is not the fastest."""
    def run(name, stage, steady, **extra):
        key = "steady_tokens_per_second" if stage == "sft" else "steady_pairs_per_second"
        return {"who": "job", "stage": stage, "name": name, key: steady, "peak_gpu_memory_gib": 40.0, **extra}

    plan = {"auto": True, "chosen": {"checkpointing": False, "micro_batch": 8}, "estimated_peak_gib": 68.4, "free_gib": 71.0}
    path = tmp_path / "bench-13b-r-full.json"
    path.write_text(json.dumps({"shape": "13b", "environment": {"device": "NVIDIA H100 80GB HBM3", "memory_free_gib": 78.6,
                                                                  "date": "2026-12-07", "git_commit": "abc1234"},
                                "runs": [run("default", "dpo", 8.5, metrics={"memory_plan": plan}), run("p_keep_4", "dpo", 6.9),
                                         run("p_keep_copy_8", "dpo", None, error="OutOfMemoryError: ..."),
                                         run("default", "sft", 7000.0), run("p_keep_copy_4", "sft", 7700.0),
                                         {**run("trl_best", "dpo", 4.25), "who": "trl"}]}))
    headline = tmp_path / "headline.json"
    headline.write_text(json.dumps({"device": "NVIDIA H200"}))
    assert bench_module.main(["card", str(path), "--headline", str(headline)]) == 0
    h = json.loads(headline.read_text())
    assert h["device"] == "NVIDIA H200"  # the top-level H200 fields stay
    (c,) = h["cards"]
    assert c["device"] == "NVIDIA H100 80GB HBM3" and c["memory_free_gib"] == 78.6
    assert c["dpo_13b"]["job_best"] == {"name": "default", "steady_pairs_per_s": 8.5} and c["dpo_13b"]["auto_vs_best"] == 1.0
    assert c["dpo_13b"]["default"]["plan"] == plan["chosen"] and c["dpo_13b"]["default"]["estimated_peak_gib"] == 68.4
    assert "skipped" in c["dpo_13b"]["p_keep_copy_8"]
    assert c["dpo_13b"]["auto_vs_peers"] == {"trl_trl_best": 2.0} and "auto_vs_peers" not in c["sft_13b"]  # a peer is not job_best
    assert c["sft_13b"]["job_best"]["name"] == "p_keep_copy_4" and c["sft_13b"]["auto_vs_best"] == 0.909
    assert bench_module.main(["card", str(path), "--headline", str(headline)]) == 0  # the same call again: replaced
    assert len(json.loads(headline.read_text())["cards"]) == 1
    alone = bench_module.card([result_file(tmp_path / "alone.json", [run("default", "sft", 7000.0)])])
    assert alone["sft_13b"]["auto_vs_best"] is None and "only 'default'" in alone["sft_13b"]["job_best"]["skipped"]
    assert alone["dpo_13b"] == {"skipped": "no DPO run of alone.json has a result"}  # a stage the call never finished


def test_the_seed_workload_end_to_end_runs_through_the_job_as_the_seed_ran_it(tmp_path):
    """`e2e`: both stages through `python -m job` with docker/sft.env and docker/dpo.env on the benchmark's data. Its
    answers are longer than the seed's data (a quarter of the examples over sft.env's 512 tokens), which the job
    refuses by default (JOB_MAX_OVER_LENGTH_SHARE, exit 3); the seed cut them silently, and the benchmark measures the
    seed's workload as the seed ran it. On 2026-12-07 a GPU call's e2e exited 3 here before this was set."""
    env = job_env(BENCH_COMMIT="abc1234")
    r = bench(env, "run", "--shape", "tiny", "--sft-examples", "48", "--dpo-pairs", "8", "--tag", "t", "--plan", "e2e",
              "--work", str(tmp_path), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    (e2e,) = json.loads((tmp_path / "out" / "bench-tiny-t.json").read_text())["runs"]
    assert e2e["ok"], json.dumps(e2e)[-3000:]
    sft, dpo = e2e["stages"]
    assert sft["metrics"]["length_policy"]["train"]["dropped"] > 0  # the cut happened, and the run went on as the seed's did
    assert sft["token_count_matches"] and dpo["exit_code"] == 0
    assert set(sft["phases_s"]) >= {"imports", "preflight", "load", "first_step", "train"}  # where its time went
