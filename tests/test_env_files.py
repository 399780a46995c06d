"""Every example env file we ship (docker/, k8s/) is a valid configuration."""

from pathlib import Path

import pytest
from dotenv import dotenv_values

from job.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
ENV_FILES = sorted(p for d in ("docker", "k8s") for p in (ROOT / d).rglob("*.env"))


def test_examples_exist():
    assert {"sft.env", "dpo.env"} <= {p.name for p in ENV_FILES}


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_env_file_parses_into_settings(path):
    values = {k: v for k, v in dotenv_values(path).items() if v is not None}
    settings = load_settings(values)
    assert settings.stage in ("sft", "dpo")
    for secret in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        assert not values.get(secret), f"{path.name} must not contain a value for {secret}"
