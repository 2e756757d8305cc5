"""`BuildKey`: every input that changes a compiled build, and nothing else.

A build is only reusable if *all* of these are the same: the model config and weights,
the exact pass pipeline (each pass's uuid hashes its source, so editing a pass invalidates
old builds by itself), the batch buckets, the dtype, the device the code was generated for,
and the toolchain that generated it. The store names a build directory after
`BuildKey.digest()`, so a key that forgets an input would silently serve a stale build.

Canonical form. The digest is sha256 over JSON with sorted keys and no whitespace. Floats
are written as ``{"$float": float.hex()}`` so the text is exact and independent of any
float printer; ints, floats and bools stay distinct (``10000`` and ``10000.0`` give different
digests: a spurious miss costs a recompile, a spurious hit would serve a wrong build).
Config keys starting with ``$`` are reserved for that tag.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from compiled_serve.cache.errors import InvalidBuildKeyError

# Bump when the store's on-disk layout or the meaning of a key field changes.
FORMAT_VERSION = 1

_FLOAT_TAG = "$float"


def canonical_json(obj: Any) -> bytes:
    """The one serialization every digest in the store is computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def _freeze(value: Any, path: str) -> Any:
    """Deep-copy `value` into immutable, JSON-representable types (dict -> mapping proxy)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidBuildKeyError(f"{path}: config keys must be str, got {type(k).__name__} {k!r}")
            if k.startswith("$"):
                raise InvalidBuildKeyError(f"{path}.{k}: keys starting with '$' are reserved")
            out[k] = _freeze(v, f"{path}.{k}")
        return MappingProxyType(out)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, f"{path}[{i}]") for i, v in enumerate(value))
    raise InvalidBuildKeyError(
        f"{path}: {type(value).__name__} is not a plain config value (use str/int/float/bool/None/list/dict)"
    )


def _encode(value: Any) -> Any:
    """Frozen value -> JSON-ready value, floats tagged with their exact hex form."""
    if isinstance(value, float):
        return {_FLOAT_TAG: value.hex()}
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    """Inverse of `_encode`, for keys read back from a manifest."""
    if isinstance(value, dict):
        if set(value) == {_FLOAT_TAG}:
            return float.fromhex(value[_FLOAT_TAG])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _require_str(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or not value:
        raise InvalidBuildKeyError(f"{name} must be a non-empty str, got {value!r}")


class Toolchain(NamedTuple):
    """What generated the code: part of every key, filled in by `current_toolchain()`."""

    torch_version: str
    triton_version: str | None
    device_capability: str


def _triton_version() -> str | None:
    # Read the installed distribution's metadata rather than importing triton (slow, and
    # on CPU-only hosts importing it can fail even though it is installed).
    from importlib import metadata

    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-xpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def current_toolchain(device: str | None = None) -> Toolchain:
    """torch/triton versions and the capability of `device` (default: cuda if present, else cpu).

    GPU builds are tied to the compute capability (``cuda:9.0``) because Triton emits code
    for one architecture; CPU builds to the ISA level Inductor vectorizes for
    (``cpu:x86_64-avx512``), since a build for AVX-512 will not run on an AVX2 host.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        kind = "rocm" if torch.version.hip else "cuda"
        capability = f"{kind}:{major}.{minor}"
    elif dev.type == "cpu":
        isa = torch.backends.cpu.get_cpu_capability().lower()
        capability = f"cpu:{platform.machine().lower()}-{isa}"
    else:
        capability = dev.type
    return Toolchain(torch.__version__, _triton_version(), capability)


@dataclasses.dataclass(frozen=True, eq=False)
class BuildKey:
    """Everything that changes a build. Equal keys <=> equal `digest()`.

    `passes` is ordered (running A then B differs from B then A); `buckets` is a set of
    batch sizes and is stored sorted, so the order they were listed in does not matter.
    """

    model_config: Mapping[str, Any]
    weight_fingerprint: str
    passes: tuple[tuple[str, str], ...]
    buckets: tuple[int, ...]
    dtype: str
    device_capability: str
    torch_version: str
    triton_version: str | None
    compile_mode: str
    format_version: int = FORMAT_VERSION
    # Weight quantization (models/quantization.py). Written into the canonical form only when it
    # is not "none", so unquantized keys keep the digests they had before the field existed.
    quantization: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.model_config, Mapping):
            raise InvalidBuildKeyError(
                f"model_config must be a mapping, got {type(self.model_config).__name__}"
            )
        object.__setattr__(self, "model_config", _freeze(self.model_config, "model_config"))
        object.__setattr__(self, "passes", self._check_passes(self.passes))
        object.__setattr__(self, "buckets", self._check_buckets(self.buckets))
        for name in ("weight_fingerprint", "dtype", "device_capability", "torch_version", "compile_mode",
                     "quantization"):
            _require_str(name, getattr(self, name))
        _require_str("triton_version", self.triton_version, optional=True)
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int):
            raise InvalidBuildKeyError(f"format_version must be an int, got {self.format_version!r}")

    @staticmethod
    def _check_passes(passes: Iterable[Any]) -> tuple[tuple[str, str], ...]:
        out = []
        for i, item in enumerate(passes):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise InvalidBuildKeyError(f"passes[{i}] must be a (name, uuid) pair, got {item!r}")
            name, uuid = item
            _require_str(f"passes[{i}] name", name)
            _require_str(f"passes[{i}] uuid", uuid)
            out.append((name, uuid))
        return tuple(out)

    @staticmethod
    def _check_buckets(buckets: Iterable[Any]) -> tuple[int, ...]:
        values = list(buckets)
        for b in values:
            if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
                raise InvalidBuildKeyError(f"buckets must be positive ints, got {b!r}")
        if len(set(values)) != len(values):
            raise InvalidBuildKeyError(f"buckets has duplicates: {values}")
        if not values:
            raise InvalidBuildKeyError("buckets must not be empty")
        return tuple(sorted(values))

    @classmethod
    def for_current_toolchain(
        cls,
        *,
        model_config: Mapping[str, Any],
        weight_fingerprint: str,
        passes: Iterable[tuple[str, str]],
        buckets: Iterable[int],
        dtype: Any,
        compile_mode: str = "default",
        device: Any = None,
        quantization: str = "none",
    ) -> BuildKey:
        """A key for a build made here and now; the toolchain fields come from this process.

        This is how the engine keys its build (`LLMEngine.build_key`): `model_config` is
        `ModelConfig.to_dict()`, `passes` the pipeline's (name, uuid) pairs in order. `dtype`
        may be a `torch.dtype` or its name ("bfloat16"), `device` a `torch.device` or a str.
        """
        tc = current_toolchain(None if device is None else str(device))
        return cls(
            model_config=model_config,
            weight_fingerprint=weight_fingerprint,
            passes=tuple(passes),
            buckets=tuple(buckets),
            dtype=str(dtype).removeprefix("torch."),
            device_capability=tc.device_capability,
            torch_version=tc.torch_version,
            triton_version=tc.triton_version,
            compile_mode=compile_mode,
            quantization=quantization,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; the exact input of `digest()` and what manifests store."""
        return {
            "model_config": _encode(self.model_config),
            "weight_fingerprint": self.weight_fingerprint,
            "passes": [list(p) for p in self.passes],
            "buckets": list(self.buckets),
            "dtype": self.dtype,
            "device_capability": self.device_capability,
            "torch_version": self.torch_version,
            "triton_version": self.triton_version,
            "compile_mode": self.compile_mode,
            "format_version": self.format_version,
            **({"quantization": self.quantization} if self.quantization != "none" else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildKey:
        """Rebuild a key from `to_dict()` output (e.g. a manifest); unknown fields are refused."""
        expected = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, Mapping) or set(data) not in (expected, expected - {"quantization"}):
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise InvalidBuildKeyError(f"key fields must be exactly {sorted(expected)}, got {got}")
        fields = dict(data)
        fields["model_config"] = _decode(fields["model_config"])
        if not isinstance(fields["passes"], list) or not isinstance(fields["buckets"], list):
            raise InvalidBuildKeyError("passes and buckets must be lists")
        fields["passes"] = tuple(tuple(p) if isinstance(p, list) else p for p in fields["passes"])
        fields["buckets"] = tuple(fields["buckets"])
        return cls(**fields)

    def digest(self) -> str:
        """sha256 hex of the canonical JSON: the build's directory name in the store."""
        return hashlib.sha256(canonical_json(self.to_dict())).hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BuildKey):
            return NotImplemented
        return canonical_json(self.to_dict()) == canonical_json(other.to_dict())

    def __hash__(self) -> int:
        return hash(self.digest())

    def diff(self, other: BuildKey) -> list[str]:
        """Names of the fields whose canonical values differ, in declaration order."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f.name
            for f in dataclasses.fields(self)
            if canonical_json(mine.get(f.name, "none")) != canonical_json(theirs.get(f.name, "none"))
        ]

    def describe_diff(self, other: BuildKey) -> list[str]:
        """Human lines such as ``dtype differs (bfloat16 vs float16)``; self first, other second."""
        lines = []
        for name in self.diff(other):
            if name == "model_config":
                a, b = self.model_config, other.model_config
                keys = sorted(
                    k
                    for k in set(a) | set(b)
                    if k not in a
                    or k not in b
                    or canonical_json(_encode(a[k])) != canonical_json(_encode(b[k]))
                )
                lines.append(f"model_config differs (keys: {', '.join(keys)})")
            else:
                a, b = getattr(self, name), getattr(other, name)
                lines.append(f"{name} differs ({_short(a)} vs {_short(b)})")
        return lines


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
