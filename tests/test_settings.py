import json
import re

import pytest

from job.errors import ConfigError
from job.exitcodes import ExitCode
from job.settings import load_settings

from conftest import FAKE_SECRET, job_env, run_job

BASE = {"JOB_STAGE": "sft", "JOB_BASE_MODEL": "hf://llm-jp/llm-jp-3-13b", "JOB_DATA": "s3://bucket/sft.jsonl", "JOB_OUTPUT": "s3://bucket/runs"}


def test_defaults_are_qlora():
    s = load_settings(BASE)
    assert (s.quant.load_in, s.quant.type, s.quant.double_quant, s.quant.compute_dtype) == ("4bit", "nf4", True, "bfloat16")
    assert s.lora.modules() == "all-linear"
    assert s.train.max_steps == -1 and s.adapter is None


def test_nested_groups_and_types():
    s = load_settings({**BASE, "JOB_LORA__R": "64", "JOB_TRAIN__LEARNING_RATE": "1e-4", "JOB_LORA__TARGET_MODULES": "q_proj, v_proj",
                       "JOB_QUANT__LOAD_IN": "8bit", "JOB_DPO__BETA": "0.2"})
    assert s.lora.r == 64 and s.train.learning_rate == 1e-4 and s.lora.modules() == ["q_proj", "v_proj"]
    assert s.quant.load_in == "8bit" and s.dpo.beta == 0.2


def test_every_missing_required_variable_is_named_at_once():
    with pytest.raises(ConfigError) as e:
        load_settings({})
    for name in ("JOB_STAGE", "JOB_BASE_MODEL", "JOB_DATA", "JOB_OUTPUT"):
        assert f"{name}: required" in str(e.value)


def test_unknown_and_invalid_variables_are_named_together():
    with pytest.raises(ConfigError) as e:
        load_settings({**BASE, "JOB_TRAIN__LEARNIG_RATE": "1e-4", "JOB_LORA__R": "sixteen", "JOB_STAGE": "ppo", "JOB_FOO": "1"})
    msg = str(e.value)
    assert re.search(r"JOB_TRAIN__LEARNIG_RATE: unknown variable: .*\(did you mean JOB_TRAIN__LEARNING_RATE\?\)", msg)
    assert "JOB_FOO: unknown variable" in msg
    assert "JOB_LORA__R:" in msg and "'sixteen'" in msg
    assert "JOB_STAGE:" in msg and "'ppo'" in msg


def test_bad_uri_is_rejected_with_the_variable():
    with pytest.raises(ConfigError, match=r"JOB_DATA: .*unsupported scheme"):
        load_settings({**BASE, "JOB_DATA": "gs://bucket/x.jsonl"})
    with pytest.raises(ConfigError, match=r"JOB_BASE_MODEL: .*hf://org/name"):
        load_settings({**BASE, "JOB_BASE_MODEL": "hf://just-a-name"})


def test_cross_field_check():
    with pytest.raises(ConfigError, match="JOB_EVAL_DATA or JOB_EVAL_FRACTION"):
        load_settings({**BASE, "JOB_EVAL_DATA": "s3://bucket/eval.jsonl", "JOB_EVAL_FRACTION": "0.1"})


def test_run_id_default_is_unique_and_sortable():
    s = load_settings(BASE)
    a, b = s.resolved_run_id(), s.resolved_run_id()
    assert a != b and a[:15] == b[:15] and a[8] == "-"
    with pytest.raises(ConfigError, match="JOB_RUN_ID"):
        load_settings({**BASE, "JOB_RUN_ID": "../escape"})


def test_secrets_never_echoed_in_errors_or_config():
    with pytest.raises(ConfigError) as e:
        # a secret in a mistyped variable name must not be echoed either
        load_settings({**BASE, "HF_TOKEN": FAKE_SECRET, "JOB_HF_TOKEN": FAKE_SECRET, "JOB_LORA__R": "x"})
    assert FAKE_SECRET not in str(e.value)
    s = load_settings({**BASE, "HF_TOKEN": FAKE_SECRET})
    assert s.hf_token.get_secret_value() == FAKE_SECRET
    assert FAKE_SECRET not in json.dumps(s.masked()) and s.masked()["hf_token"] == "***"


def test_cli_print_config_masks_and_invalid_config_exits_2():
    r = run_job(job_env(**BASE, HF_TOKEN=FAKE_SECRET), "--print-config")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["stage"] == "sft" and cfg["hf_token"] == "***"
    assert FAKE_SECRET not in r.stdout + r.stderr

    r = run_job(job_env(HF_TOKEN=FAKE_SECRET, JOB_STAGE="sft", JOB_TRAIN__MAX_STEP="5"))
    assert r.returncode == ExitCode.CONFIG
    for name in ("JOB_TRAIN__MAX_STEP: unknown variable: not a field of TRL's SFTConfig (did you mean JOB_TRAIN__MAX_STEPS?)", "JOB_DATA: required", "JOB_OUTPUT: required"):
        assert name in r.stderr
    assert "Traceback" not in r.stderr and FAKE_SECRET not in r.stderr


def test_cli_help_lists_exit_codes():
    r = run_job(job_env(), "--help")
    assert r.returncode == 0
    assert "--check" in r.stdout and "--print-config" in r.stdout and "75 transient" in r.stdout


@pytest.mark.parametrize("extra, message", [
    ({"JOB_TRAIN__OPTIM": "adamw_foo"}, "JOB_TRAIN__OPTIM: adamw_foo is not a valid OptimizerNames"),
    ({"JOB_TRAIN__LR_SCHEDULER_TYPE": "cosin"}, "JOB_TRAIN__LR_SCHEDULER_TYPE: cosin is not a valid SchedulerType"),
    ({"JOB_STAGE": "dpo", "JOB_DPO__LOSS_TYPE": "sigmod"}, "JOB_DPO__LOSS_TYPE: unknown loss type 'sigmod'"),
    ({"JOB_TRAIN__REPORT_TO": "tensorbord"}, "JOB_TRAIN__REPORT_TO: unknown integration 'tensorbord'"),
    ({"JOB_TRAIN__REPORT_TO": "wandb"}, "JOB_TRAIN__REPORT_TO: 'wandb' is not installed"),
    ({"JOB_TRAIN__NEFTUNE_NOISE_ALPHA": "five"}, "JOB_TRAIN__NEFTUNE_NOISE_ALPHA: invalid value 'five'"),
    ({"JOB_TRAIN__OUTPUT_DIR": "/x"}, "JOB_TRAIN__OUTPUT_DIR: set by the job; use JOB_OUTPUT"),
    ({"JOB_TRAIN__TRUNCATION_MODE": "keep_end"}, "JOB_TRAIN__TRUNCATION_MODE: set by the job; use JOB_TRAIN__OVER_LENGTH"),
    ({"JOB_STAGE": "dpo", "JOB_DPO__BETTA": "0.2"}, "JOB_DPO__BETTA: unknown variable: not a field of TRL's DPOConfig (did you mean JOB_DPO__BETA?)"),
])
def test_training_values_go_through_trls_own_configs(extra, message):
    with pytest.raises(ConfigError) as e:
        load_settings({**BASE, **extra})
    assert message in str(e.value)


def test_any_field_of_the_stages_trl_config_can_be_set_by_name():
    from job import trainargs

    s = load_settings({**BASE, "JOB_TRAIN__NEFTUNE_NOISE_ALPHA": "5", "JOB_TRAIN__LOGGING_NAN_INF_FILTER": "false"})
    args = trainargs.build(s, trainargs.Runtime())
    assert args.neftune_noise_alpha == 5.0 and args.logging_nan_inf_filter is False
    assert args.learning_rate == 2e-4 and args.optim == "adamw_torch"  # the job's typed defaults stay
    s = load_settings({**BASE, "JOB_STAGE": "dpo", "JOB_DPO__PRECOMPUTE_REF_LOG_PROBS": "true", "JOB_DPO__BETA": "0.3"})
    args = trainargs.build(s, trainargs.Runtime())
    assert args.precompute_ref_log_probs is True and args.beta == 0.3 and args.loss_type == ["sigmoid"]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_ddp_does_not_rebroadcast_buffers_before_each_forward(stage, tmp_path):
    """DDP sends every registered buffer from rank 0 before each forward unless told not to: the dequantized copy of
    the base is one (24 GiB per micro-batch at 13B), RoPE's inv_freq another, and none changes in training. The
    setting reaches the DDP wrapper accelerate builds (transformers' Trainer passes it as a kwargs handler)."""
    import torch
    from transformers import Trainer

    from job import trainargs

    s = load_settings({"JOB_STAGE": stage, "JOB_BASE_MODEL": "/m", "JOB_DATA": "/d", "JOB_OUTPUT": str(tmp_path)})
    args = trainargs.build(s, trainargs.Runtime(output_dir=str(tmp_path / "c")))
    assert args.ddp_broadcast_buffers is False
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
    assert trainer.accelerator.ddp_handler.broadcast_buffers is False
