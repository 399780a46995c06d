"""The README's settings table and docs/configuration.md name real settings, and the latter names every one."""

import re
from pathlib import Path

from job.settings import DELIM, PREFIX, JobSettings, _known_env_names

ROOT = Path(__file__).resolve().parents[1]


def table_variables(path: Path) -> set[str]:
    """Every variable in the first cell of a markdown table row (`JOB_LORA__R`, `__ALPHA`: JOB_LORA__ALPHA)."""
    names = set()
    for row in re.findall(r"^\| (`JOB_[^|]*?) \|", path.read_text(encoding="utf-8"), re.M):
        group = ""
        for name in re.findall(r"`([A-Z0-9_]+)`", row):
            if name.startswith(DELIM):
                name = group + name
            group = name.rsplit(DELIM, 1)[0] if DELIM in name else name
            names.add(name)
    return names


def test_the_readme_and_the_configuration_page_name_real_settings():
    known = _known_env_names()
    readme, full = table_variables(ROOT / "README.md"), table_variables(ROOT / "docs" / "configuration.md")
    assert len(readme) >= 12 and readme <= known, readme - known
    assert full <= known, full - known
    # Every field the job defines (TRL's own fields under JOB_TRAIN__/JOB_DPO__ are TRL's to document).
    ours = {f"{PREFIX}{n}".upper() for n, f in JobSettings.model_fields.items() if n != "hf_token"
            and not (isinstance(f.annotation, type) and hasattr(f.annotation, "model_fields"))}
    ours |= {n for n in known if DELIM in n}
    assert not ours - full, sorted(ours - full)
