"""job/fastpaths.py: each fast path only where the model and the machine have what it needs, decided from the config
(before any weights) with the reason for every path that is off. The families themselves are trained and compared in
tests/test_families.py."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from job import attention, fastpaths
from job.errors import ModelError
from job.settings import load_settings


def _settings(stage="sft", **env):
    return load_settings({"JOB_STAGE": stage, "JOB_BASE_MODEL": "/m", "JOB_DATA": "/d", "JOB_OUTPUT": "/o", **env})


def test_llama_on_the_cpu_gets_the_packed_attention_and_padding_free_dpo():
    fast = fastpaths.decide(_settings("dpo"), AutoConfig.for_model("llama"), "cpu")
    assert fast.attention == attention.NAME and fast.padding_free
    assert fast.report()["packed_attention"] == {"on": True, "why": "packed rows through one causal SDPA per example (CPU)"}


def test_packing_off_turns_both_off_and_says_so():
    fast = fastpaths.decide(_settings("dpo", JOB_TRAIN__PACKING="false"), AutoConfig.for_model("mistral"), "cpu")
    assert not fast.padding_free and fast.report()["padding_free_dpo"]["why"] == "JOB_TRAIN__PACKING=false"


def test_a_gpu_without_the_varlen_kernel_gets_sdpa_and_no_padding_free_dpo(monkeypatch):
    """Pre-Ampere GPUs or torch < 2.10: padding-free DPO would run one dense mask over all rows (it was installed
    anyway before job/fastpaths.py)."""
    monkeypatch.setattr(attention, "kernel_available", lambda device: False)
    fast = fastpaths.decide(_settings("dpo"), AutoConfig.for_model("llama"), "cuda:0")
    assert fast.attention == "sdpa" and not fast.padding_free
    assert "needs the packed attention" in fast.report()["padding_free_dpo"]["why"]


def test_softcapping_models_get_eager_attention():
    fast = fastpaths.decide(_settings("dpo"), AutoConfig.for_model("gemma2"), "cpu")
    assert fast.attention == "eager" and not fast.padding_free
    assert "soft-caps" in fast.report()["packed_attention"]["why"]


@pytest.mark.parametrize("model_type", ["bloom", "falcon", "mpt"])
def test_attention_in_its_own_code_refuses_packed_sft_and_runs_dpo_padded(model_type):
    config = AutoConfig.for_model(model_type)
    with pytest.raises(ModelError, match="JOB_TRAIN__PACKING=false") as e:
        fastpaths.decide(_settings("sft"), config, "cpu")
    assert "ForCausalLM" in str(e.value)
    assert fastpaths.decide(_settings("sft", JOB_TRAIN__PACKING="false"), config, "cpu").attention in ("sdpa", "eager")
    dpo = fastpaths.decide(_settings("dpo"), config, "cpu")
    assert not dpo.padding_free and "own code" in dpo.report()["padding_free_dpo"]["why"]
