"""Makes a Python process see a CPU without AVX512-BF16, on any x86 host (tests/test_hosts.py): bitsandbytes' native
check `has_avx512bf16_cpu()` answers False from the moment its library is loaded (before bitsandbytes' CPU backend
and its Linear4bit read it), and ATEN_CPU_CAPABILITY=avx2, set beside this, does the same for torch's kernels.
On this PYTHONPATH it is imported at the interpreter's start (the `site` module's sitecustomize hook)."""

import importlib.abc
import importlib.machinery
import sys


class _NoAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.cextension":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            object.__setattr__(module.lib, "has_avx512bf16_cpu", lambda: False)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _NoAvx512Bf16())
