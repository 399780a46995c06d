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
    text = " ".join(r.stdout.split())  # argparse wraps the epilog wherever the width falls
    assert "--check" in text and "--print-config" in text and "6 diverged" in text and "75 transient" in text


TRL_PROBLEMS = [
    ({"JOB_TRAIN__OPTIM": "adamw_foo"}, "JOB_TRAIN__OPTIM: adamw_foo is not a valid OptimizerNames"),
    ({"JOB_TRAIN__LR_SCHEDULER_TYPE": "cosin"}, "JOB_TRAIN__LR_SCHEDULER_TYPE: cosin is not a valid SchedulerType"),
    ({"JOB_STAGE": "dpo", "JOB_DPO__LOSS_TYPE": "sigmod"}, "JOB_DPO__LOSS_TYPE: unknown loss type 'sigmod'"),
    ({"JOB_TRAIN__REPORT_TO": "tensorbord"}, "JOB_TRAIN__REPORT_TO: unknown integration 'tensorbord'"),
    ({"JOB_TRAIN__REPORT_TO": "wandb"}, "JOB_TRAIN__REPORT_TO: 'wandb' is not installed"),
    ({"JOB_TRAIN__NEFTUNE_NOISE_ALPHA": "five"}, "JOB_TRAIN__NEFTUNE_NOISE_ALPHA: invalid value 'five'"),
    ({"JOB_TRAIN__OUTPUT_DIR": "/x"}, "JOB_TRAIN__OUTPUT_DIR: set by the job; use JOB_OUTPUT"),
    ({"JOB_TRAIN__TRUNCATION_MODE": "keep_end"}, "JOB_TRAIN__TRUNCATION_MODE: set by the job; use JOB_TRAIN__OVER_LENGTH"),
    ({"JOB_STAGE": "dpo", "JOB_DPO__BETTA": "0.2"}, "JOB_DPO__BETTA: unknown variable: not a field of TRL's DPOConfig (did you mean JOB_DPO__BETA?)"),
    ({"JOB_LORA__USE_DORAA": "true"}, "JOB_LORA__USE_DORAA: unknown variable: not a LoRA setting or a field of PEFT's LoraConfig"),
]


@pytest.mark.parametrize("extra, message", TRL_PROBLEMS)
def test_training_values_go_through_trls_own_configs(extra, message):
    with pytest.raises(ConfigError) as e:
        load_settings({**BASE, **extra})
    assert message in str(e.value)


@pytest.mark.parametrize("extra, message", TRL_PROBLEMS)
def test_a_run_checks_the_same_values_once_its_data_is_checked(extra, message):
    """A run and --check load the settings with trl="later" (job/preflight.py checks storage and data first, without
    the training stack): the same problem, the same message, from check_library_settings."""
    from job.settings import check_library_settings

    s = load_settings({**BASE, **extra}, trl="later")
    with pytest.raises(ConfigError) as e:
        check_library_settings(s)
    assert message in str(e.value)
    check_library_settings(load_settings(BASE, trl="later"))  # nothing to say about the defaults


def test_any_field_of_the_stages_trl_config_can_be_set_by_name():
    from job import trainargs

    s = load_settings({**BASE, "JOB_TRAIN__NEFTUNE_NOISE_ALPHA": "5", "JOB_TRAIN__LOGGING_NAN_INF_FILTER": "false"})
    args = trainargs.build(s, trainargs.Runtime())
    assert args.neftune_noise_alpha == 5.0 and args.logging_nan_inf_filter is False
    assert args.learning_rate == 2e-4 and args.optim == "adamw_torch"  # the job's typed defaults stay
    s = load_settings({**BASE, "JOB_STAGE": "dpo", "JOB_DPO__PRECOMPUTE_REF_LOG_PROBS": "true", "JOB_DPO__BETA": "0.3"})
    args = trainargs.build(s, trainargs.Runtime())
    assert args.precompute_ref_log_probs is True and args.beta == 0.3 and args.loss_type == ["sigmoid"]


@pytest.mark.parametrize("extra, message", [
    ({"JOB_LORA__USE_DORRA": "true"}, "JOB_LORA__USE_DORRA: unknown variable: not a LoRA setting or a field of PEFT's "
                                      "LoraConfig (did you mean JOB_LORA__USE_DORA?)"),
    ({"JOB_LORA__ALPHAA": "8"}, "(did you mean JOB_LORA__ALPHA?)"),
    ({"JOB_LORA__LORA_ALPHA": "8"}, "JOB_LORA__LORA_ALPHA: set by the job; use JOB_LORA__ALPHA"),
    ({"JOB_LORA__TASK_TYPE": "SEQ_CLS"}, "JOB_LORA__TASK_TYPE: set by the job"),
    ({"JOB_LORA__USE_RSLORA": "maybe"}, "JOB_LORA__USE_RSLORA: invalid value 'maybe'"),
    ({"JOB_LORA__BIAS": "lora"}, "JOB_LORA__BIAS: invalid value 'lora' (one of 'none', 'all', 'lora_only')"),
    ({"JOB_LORA__INIT_LORA_WEIGHTS": "gauss"}, "JOB_LORA__INIT_LORA_WEIGHTS: invalid value 'gauss' (one of 'gaussian',"),
    ({"JOB_LORA__INIT_LORA_WEIGHTS": "pissa"}, "JOB_LORA__INIT_LORA_WEIGHTS=pissa: not supported: it starts from the base"),
    ({"JOB_LORA__INIT_LORA_WEIGHTS": "olora"}, "JOB_LORA__INIT_LORA_WEIGHTS=olora: not supported"),
    ({"JOB_LORA__INIT_LORA_WEIGHTS": "mica"}, "JOB_LORA__INIT_LORA_WEIGHTS=mica: not supported: it reads the base"),
    ({"JOB_LORA__INIT_LORA_WEIGHTS": "orthogonal", "JOB_LORA__R": "5"}, "needs an even rank (JOB_LORA__R=5)"),
    # PEFT's own __post_init__ refuses it; the message names the variable.
    ({"JOB_LORA__LAYERS_TO_TRANSFORM": "0"}, "JOB_LORA__LAYERS_TO_TRANSFORM: PEFT's LoraConfig refused it: "
                                             "`layers_to_transform` cannot be used when `target_modules` is a str"),
    ({"JOB_TRAIN__LORAPLUS_LR_RATIO": "0"}, "JOB_TRAIN__LORAPLUS_LR_RATIO: Input should be greater than 0"),
])
def test_lora_values_go_through_peft_own_config(extra, message):
    with pytest.raises(ConfigError) as e:
        load_settings({**BASE, **extra})
    assert message in str(e.value)


def test_any_field_of_peft_lora_config_can_be_set_by_name():
    """JOB_LORA__<FIELD> for any LoraConfig field, converted to PEFT's type (so the printed config and the run identity
    say `true` whatever the spelling); the job's short names stay."""
    from job.model import lora_config

    s = load_settings({**BASE, "JOB_LORA__R": "8", "JOB_LORA__ALPHA": "16", "JOB_LORA__USE_RSLORA": "1",
                       "JOB_LORA__USE_DORA": "yes", "JOB_LORA__INIT_LORA_WEIGHTS": "gaussian",
                       "JOB_LORA__RANK_PATTERN": '{"q_proj": 4}', "JOB_LORA__EXCLUDE_MODULES": "lm_head,o_proj"})
    c = lora_config(s.lora)
    assert (c.r, c.lora_alpha, c.lora_dropout, c.target_modules) == (8, 16, 0.05, "all-linear")
    assert c.use_rslora is True and c.use_dora is True and c.init_lora_weights == "gaussian"
    assert c.rank_pattern == {"q_proj": 4} and set(c.exclude_modules) == {"lm_head", "o_proj"}
    assert s.masked()["lora"]["use_rslora"] is True
    # On a 16-bit base only the inits that read packed 4-bit weights become possible; the residual-changing ones never.
    assert lora_config(load_settings({**BASE, "JOB_QUANT__LOAD_IN": "none", "JOB_LORA__INIT_LORA_WEIGHTS": "mica"}).lora,
                       load_settings({**BASE, "JOB_QUANT__LOAD_IN": "none"}).quant).init_lora_weights == "mica"
    with pytest.raises(ConfigError, match="INIT_LORA_WEIGHTS=pissa: not supported"):
        load_settings({**BASE, "JOB_QUANT__LOAD_IN": "none", "JOB_LORA__INIT_LORA_WEIGHTS": "pissa"})


def test_loraplus_ratio_is_a_job_setting_not_a_trl_field():
    """JOB_TRAIN__LORAPLUS_LR_RATIO is the job's (PEFT's create_loraplus_optimizer); TRL has no field of that name, so it
    is never passed to SFTConfig/DPOConfig under another meaning."""
    from trl import DPOConfig, SFTConfig

    from job import trainargs

    assert all("loraplus_lr_ratio" not in trainargs._fields(c) for c in (SFTConfig, DPOConfig))
    s = load_settings({**BASE, "JOB_TRAIN__LORAPLUS_LR_RATIO": "16"})
    assert s.train.loraplus_lr_ratio == 16.0 and "loraplus_lr_ratio" not in trainargs.build_kwargs(s, trainargs.Runtime())


URI_SETTINGS = ("JOB_BASE_MODEL", "JOB_DATA", "JOB_EVAL_DATA", "JOB_EVAL_PROMPTS", "JOB_ADAPTER", "JOB_OUTPUT")


@pytest.mark.parametrize("name", URI_SETTINGS)
@pytest.mark.parametrize("value, says", [
    ("s3:/my-bucket/runs", "did you mean s3://my-bucket/runs?"),
    ("S3://my-bucket/runs", "did you mean s3://my-bucket/runs?"),
    ("hf:/org/repo", "did you mean hf://org/repo?"),
    ("hf:org/repo", "did you mean hf://org/repo?"),
    ("gs://my-bucket/runs", "unsupported scheme 'gs://'"),
    ("file:///tmp/x", "unsupported scheme"),
])
def test_what_looks_like_a_uri_but_is_not_one_is_refused(name, value, says):
    # Before: s3:/..., hf:/... became local relative folders (the run wrote to ./s3:/... and succeeded).
    with pytest.raises(ConfigError) as e:
        load_settings({**BASE, name: value})
    assert f"{name}: {value!r}" in str(e.value) and says in str(e.value)


def test_local_paths_with_a_colon_stay_possible():
    assert load_settings({**BASE, "JOB_OUTPUT": "./runs:v1"}).output == "./runs:v1"


@pytest.mark.parametrize("name, value", [("JOB_TRAIN__LEARNING_RATE", "inf"), ("JOB_TRAIN__LEARNING_RATE", "nan"),
                                         ("JOB_TRAIN__MAX_GRAD_NORM", "inf"), ("JOB_LORA__DROPOUT", "nan"),
                                         ("JOB_EVAL_FRACTION", "nan"), ("JOB_DPO__BETA", "inf"),
                                         ("JOB_TRAIN__ADAM_EPSILON", "nan")])  # a TRL field beyond the job's own
def test_non_finite_numbers_are_refused(name, value):
    with pytest.raises(ConfigError, match=rf"{name}: .*finite"):
        load_settings({**BASE, "JOB_STAGE": "dpo" if "DPO" in name else "sft", name: value})


def test_warmup_ratio_of_one_or_more_points_at_warmup_steps():
    # transformers reads warmup values >= 1 as a number of steps: RATIO=1 was one warm-up step.
    with pytest.raises(ConfigError, match=r"JOB_TRAIN__WARMUP_RATIO: must be below 1.*JOB_TRAIN__WARMUP_STEPS"):
        load_settings({**BASE, "JOB_TRAIN__WARMUP_RATIO": "1"})
    assert load_settings({**BASE, "JOB_TRAIN__WARMUP_RATIO": "0.5"}).train.warmup_ratio == 0.5


def test_two_column_roles_on_one_column_are_refused():
    with pytest.raises(ConfigError, match=r"JOB_COLUMNS__PROMPT and JOB_COLUMNS__COMPLETION both name column 'output'"):
        load_settings({**BASE, "JOB_COLUMNS__PROMPT": "output", "JOB_COLUMNS__COMPLETION": "output"})
    with pytest.raises(ConfigError, match=r"JOB_COLUMNS__CHOSEN and JOB_COLUMNS__REJECTED both name column 'a'"):
        load_settings({**BASE, "JOB_STAGE": "dpo", "JOB_COLUMNS__CHOSEN": "a", "JOB_COLUMNS__REJECTED": "a"})
    load_settings({**BASE, "JOB_COLUMNS__PROMPT": "q", "JOB_COLUMNS__COMPLETION": "a"})


def test_settings_that_would_be_ignored_are_warned_about(tiny_model):
    from job.preflight import setting_warnings

    def warnings(**env):
        return setting_warnings(load_settings({**BASE, **env}), tiny_model)

    assert warnings() == []
    [w] = warnings(JOB_ADAPTER="s3://bucket/adapter", JOB_LORA__R="64", JOB_LORA__TARGET_MODULES="q_proj")
    assert w.startswith("JOB_LORA__R, JOB_LORA__TARGET_MODULES ignored: JOB_ADAPTER continues an existing adapter")
    [w] = warnings(JOB_STAGE="dpo", JOB_LORA__DROPOUT="0.1")
    assert w.startswith("JOB_LORA__DROPOUT ignored: DPO turns every dropout off")
    assert warnings(JOB_STAGE="dpo", JOB_LORA__DROPOUT="0.1", JOB_TRAIN__DISABLE_DROPOUT="false") == []
    assert warnings(JOB_LORA__DROPOUT="0.1") == []  # SFT uses it
    [w] = warnings(JOB_TRAIN__MAX_LENGTH="2048")  # the tiny model has 1024 positions
    assert "JOB_TRAIN__MAX_LENGTH=2048 is above the base model's max_position_embeddings (1024)" in w


def test_lora_dropout_is_no_part_of_a_dpo_run_identity():
    from job.preflight import identity

    class Inputs:
        identity = {}

    models = {"base_model": {"uri": "x"}, "adapter": None}

    def sha(**env):
        return identity(load_settings({**BASE, **env}), Inputs(), models)["sha256"]

    assert sha(JOB_STAGE="dpo", JOB_LORA__DROPOUT="0.1") == sha(JOB_STAGE="dpo", JOB_LORA__DROPOUT="0.2")
    assert sha(JOB_STAGE="dpo", JOB_LORA__DROPOUT="0.1", JOB_TRAIN__DISABLE_DROPOUT="false") != \
        sha(JOB_STAGE="dpo", JOB_LORA__DROPOUT="0.2", JOB_TRAIN__DISABLE_DROPOUT="false")
    assert sha(JOB_LORA__DROPOUT="0.1") != sha(JOB_LORA__DROPOUT="0.2")  # SFT trains with it


def test_check_and_the_log_warn_about_ignored_settings(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import DEMO_DATA

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules="all-linear")).save_pretrained(adapter)
    env = job_env(JOB_BASE_MODEL=str(tiny_model), JOB_OUTPUT=str(tmp_path / "out"), JOB_WORKDIR=str(tmp_path / "w"),
                  JOB_LOG_FORMAT="json")
    r = run_job({**env, "JOB_STAGE": "sft", "JOB_DATA": str(DEMO_DATA / "sft.jsonl"), "JOB_ADAPTER": str(adapter),
                 "JOB_LORA__R": "64"}, "--check")
    assert r.returncode == 0, r.stderr[-3000:]
    [w] = json.loads(r.stdout)["warnings"]
    assert w.startswith("JOB_LORA__R ignored: JOB_ADAPTER continues an existing adapter") and w in r.stderr
    r = run_job({**env, "JOB_STAGE": "dpo", "JOB_DATA": str(DEMO_DATA / "dpo.csv"), "JOB_LORA__DROPOUT": "0.1",
                 "JOB_TRAIN__MAX_LENGTH": "2048"}, "--check")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = json.loads(r.stdout)["warnings"]
    assert [w.split(" ", 1)[0] for w in warnings] == ["JOB_LORA__DROPOUT", "JOB_TRAIN__MAX_LENGTH=2048"]
    assert all(w in r.stderr for w in warnings)


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
