"""Hand-written C kernels for the CPU, compiled once per machine and called through ctypes.

A few hot CPU ops are small enough that torch's per-op dispatch, not their arithmetic, is their
cost (docs/perf-notes.md): those are one C function each, in a `<name>.c` beside this file. The
source is compiled with the system's C++ compiler (the one Inductor's CPU backend already needs)
into `<cache root>/cpu_kernels/<name>-<hash>.so`, keyed by the source, the flags, the compiler's
version and the CPU's feature flags (`-march=native`), written to a temporary name and renamed, so
concurrent processes never load half a file. OpenMP is the system libgomp, as in Inductor's
kernels. No `-ffast-math`: a shared object built with it sets flush-to-zero for the whole process.

Every kernel keeps a pure-torch path, taken when `load_c_library` returns None: no compiler, a
failed build, or `COMPILED_SERVE_CPU_KERNELS=torch` (for A/B measurements).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger("compiled_serve.kernels")

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC")
DISABLE_ENV = "COMPILED_SERVE_CPU_KERNELS"  # "torch": never use the C kernels
Signatures = dict[str, tuple[list, object]]  # function name -> (argtypes, restype)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@functools.cache
def _compiler_version(cxx: str) -> str:
    """`cxx --version`, asked once a process (it enters every library's key)."""
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _kernel_dir() -> Path:
    from compiled_serve.cache.build_cache import default_cache_root

    return default_cache_root() / "cpu_kernels"


def load_c_library(name: str, signatures: Signatures) -> ctypes.CDLL | None:
    """kernels/<name>.c compiled (or found compiled) and loaded, its functions typed; None if unavailable."""
    if os.environ.get(DISABLE_ENV, "").lower() == "torch":
        return None
    cxx = _compiler()
    if cxx is None:
        logger.info("no C compiler found: the CPU op %s runs through torch ops", name)
        return None
    source = Path(__file__).with_name(f"{name}.c")
    try:
        version = _compiler_version(cxx)
        key = hashlib.sha256("\0".join([source.read_text(), " ".join(FLAGS), version, _cpu_flags(),
                                        platform.machine()]).encode()).hexdigest()[:24]
        path = _kernel_dir() / f"{name}-{key}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                out = Path(tmp) / path.name
                subprocess.run([cxx, *FLAGS, "-x", "c++", str(source), "-o", str(out)], check=True,
                               capture_output=True, text=True)
                os.replace(out, path)  # atomic: a concurrent process sees the whole file or none
        lib = ctypes.CDLL(str(path))
        for fn_name, (argtypes, restype) in signatures.items():
            fn = getattr(lib, fn_name)
            fn.argtypes = argtypes
            fn.restype = restype
    except (OSError, AttributeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("CPU kernel %s unavailable (%s): using torch ops", name, str(detail).strip()[:500])
        return None
    return lib
