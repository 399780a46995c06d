"""How many GPUs this container may use, as torch.cuda.device_count() would say, without importing torch.

The entrypoint starts one process, or torchrun with one per GPU, from this number. It used to ask torch, whose import
alone took 2.6 s on the H100/H200 hosts (bench/results: the import profile of 1203-run5) and 2.8 s on 2 CPU cores,
at every start of every stage, and the job then imports torch again. This asks NVML directly (the driver's
libnvidia-ml, which the NVIDIA container toolkit mounts), and applies CUDA_VISIBLE_DEVICES the way torch does
(torch/cuda/__init__.py `_parse_visible_devices`, `_device_count_nvml`: ordinals up to the first invalid one,
GPU-UUID prefixes, a repeated entry means none). Where NVML can't answer (no libnvidia-ml but a CUDA driver, MIG
identifiers, an NVML error) it asks torch, as before; without either library there is no GPU.
tests/test_container.py compares it with torch's own count over a stand-in libnvidia-ml.

    python gpus.py        -> prints 0, 1, 2, ...
"""

from __future__ import annotations

import ctypes
import os


def visible(value: str | None) -> list[int] | list[str] | None:
    """CUDA_VISIBLE_DEVICES as torch reads it: None (unset: all), ordinals, or GPU-/MIG- UUID prefixes."""
    if value is None:
        return None
    if value.startswith(("GPU-", "MIG-")):
        prefix, out = value[:4], []
        for elem in value.split(","):
            if elem in out:
                return []
            if not elem.startswith(prefix):
                break
            out.append(elem)
        return out
    ordinals: list[int] = []
    for elem in value.split(","):
        x = _strtoul(elem.strip())
        if x in ordinals:
            return []
        if x < 0:
            break
        ordinals.append(x)
    return ordinals


def _strtoul(s: str) -> int:
    """The integer a string starts with (a sign allowed), or -1: C's strtoul as torch uses it."""
    digits = 0
    for i, c in enumerate(s):
        if not (c.isdigit() or (i == 0 and c in "+-")):
            break
        digits = i + 1
    try:
        return int(s[:digits]) if digits else -1
    except ValueError:  # a sign alone
        return -1


def _nvml():
    lib = ctypes.CDLL("libnvidia-ml.so.1")
    if lib.nvmlInit() != 0:
        raise OSError("nvmlInit failed")
    return lib


def _raw_count(lib) -> int:
    n = ctypes.c_int(-1)
    if lib.nvmlDeviceGetCount_v2(ctypes.byref(n)) != 0:
        raise OSError("nvmlDeviceGetCount_v2 failed")
    return n.value


def _uuids(lib) -> list[str]:
    out = []
    for i in range(_raw_count(lib)):
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0:
            raise OSError("nvmlDeviceGetHandleByIndex_v2 failed")
        buf = ctypes.create_string_buffer(96)
        if lib.nvmlDeviceGetUUID(handle, buf, 96) != 0:
            raise OSError("nvmlDeviceGetUUID failed")
        out.append(buf.raw.decode("ascii").strip("\0"))
    return out


def nvml_count(env=os.environ) -> int | None:
    """The count through NVML and CUDA_VISIBLE_DEVICES, or None where NVML can't tell (torch falls back then)."""
    devices = visible(env.get("CUDA_VISIBLE_DEVICES"))
    if devices is not None and not devices:
        return 0
    try:
        lib = _nvml()
        if devices is None:
            devices = list(range(64))  # torch's "all": trimmed to the real count below
        if isinstance(devices[0], str):
            if devices[0].startswith("MIG-"):
                return None
            uuids, ordinals = _uuids(lib), []
            for candidate in devices:
                matches = [i for i, u in enumerate(uuids) if u.startswith(candidate)]
                if len(matches) != 1:  # unknown or ambiguous: the list ends here
                    break
                if matches[0] in ordinals:
                    return 0
                ordinals.append(matches[0])
            return len(ordinals)
        raw = _raw_count(lib)
        if raw <= 0:
            return raw if raw == 0 else None
        return next((i for i, d in enumerate(devices) if d >= raw), len(devices))
    except (OSError, AttributeError):
        return None


def _has_cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def count() -> int:
    n = nvml_count()
    if n is not None:
        return n
    if not _has_cuda_driver():
        return 0  # no driver: torch would say 0 too
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":
    print(count())
