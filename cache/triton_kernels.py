"""A build's compiled Triton kernels, so that a warm start from it compiles none.

Two kinds of Triton kernel run on the GPU: Inductor's (generated code; torch's compile-cache blob
refers to them) and ours (compiled_serve.kernels: attention, the sampler, the KV write, launched
by custom ops). Both compile on first launch into Triton's cache directory, which during a build
is a fresh directory under the build's TORCHINDUCTOR_CACHE_DIR that is deleted afterwards: a warm
start measured on the H200 spent ~17 s compiling them again (docs/perf-notes.md, session 4).

`pack_triton_kernels` takes every kernel directory of that cache (one per kernel hash: the
binary, its metadata and IRs) into one tar with fixed metadata, so the artifact depends only on
the files. `install_triton_kernels` unpacks it into the Triton cache this process will use,
before the first launch. Triton's group files (`__grp__*.json`) name their members by absolute
path; those are rewritten to the new directory, or Triton would take the group as missing.

Trust: the tar comes only from a build that ArtifactStore has verified; members must be plain
files exactly one directory deep with safe names, and nothing in them is unpickled.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from pathlib import Path

log = logging.getLogger(__name__)

TRITON_KERNELS_ARTIFACT = "triton_kernels.tar"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def triton_cache_dir(device_index: int = 0) -> Path:
    """The directory Triton caches kernels in for this process: $TRITON_CACHE_DIR, else the one
    Inductor derives from TORCHINDUCTOR_CACHE_DIR (and then pins in $TRITON_CACHE_DIR, so that
    our own kernels' launches use it too)."""
    explicit = os.environ.get("TRITON_CACHE_DIR")
    if explicit:
        return Path(explicit)
    from torch._inductor.runtime.cache_dir_utils import triton_cache_dir as inductor_triton_dir

    path = Path(inductor_triton_dir(device_index))
    os.environ["TRITON_CACHE_DIR"] = str(path)
    return path


def pack_triton_kernels(cache_dir: Path) -> bytes | None:
    """Every kernel directory under `cache_dir` as one deterministic tar; None when there is none."""
    if not cache_dir.is_dir():
        return None
    members = sorted(
        (d.name, f.name, f) for d in cache_dir.iterdir() if d.is_dir() and _SAFE_NAME.match(d.name)
        for f in d.iterdir() if f.is_file() and _SAFE_NAME.match(f.name) and f.name != "lock"
    )  # fmt: skip
    if not members:
        return None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dir_name, file_name, path in members:
            data = path.read_bytes()
            if file_name.startswith("__grp__"):
                data = _relative_group(data)  # absolute paths of the build's temporary cache out
            info = tarfile.TarInfo(f"{dir_name}/{file_name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _relative_group(data: bytes) -> bytes:
    group = json.loads(data)
    group["child_paths"] = {name: os.path.basename(p) for name, p in sorted(group["child_paths"].items())}
    return json.dumps(group, sort_keys=True).encode()


def install_triton_kernels(blob: bytes, cache_dir: Path) -> list[str]:
    """Unpacks a pack_triton_kernels tar into `cache_dir`; returns the kernel directories it
    wrote to (files already present are left as they are)."""
    written: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(bytes(blob)), mode="r:") as tar:
        # Group files last: a concurrent reader that finds a group finds its members too.
        members = sorted(tar.getmembers(), key=lambda m: m.name.split("/")[-1].startswith("__grp__"))
        for member in members:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 2 or not all(_SAFE_NAME.match(p) for p in parts):
                raise ValueError(f"{TRITON_KERNELS_ARTIFACT}: unexpected member {member.name!r}")
            kernel_dir = cache_dir / parts[0]
            target = kernel_dir / parts[1]
            if target.exists():
                continue
            data = tar.extractfile(member).read()
            if parts[1].startswith("__grp__"):
                group = json.loads(data)
                group["child_paths"] = {name: str(kernel_dir / os.path.basename(p))
                                        for name, p in group["child_paths"].items()}  # fmt: skip
                data = json.dumps(group).encode()
            kernel_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)  # a concurrent start sees the whole file or none
            written.add(parts[0])
    log.debug("installed %d Triton kernel(s) into %s", len(written), cache_dir)
    return sorted(written)
