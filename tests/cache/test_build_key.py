"""BuildKey: stable digest over a canonical form, and diffs that name the field."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from compiled_serve.cache.build_key import BuildKey, current_toolchain
from compiled_serve.cache.errors import InvalidBuildKeyError

MakeKey = Callable[..., BuildKey]


def test_digest_is_stable_and_order_independent(make_key: MakeKey) -> None:
    a = make_key(model_config={"a": 1, "b": [1, 2, {"c": 0.1}]}, buckets=(8, 1, 4))
    b = make_key(model_config={"b": (1, 2, {"c": 0.1}), "a": 1}, buckets=(1, 4, 8))
    assert a.digest() == b.digest() and a == b and hash(a) == hash(b)
    # A known value: catches an accidental change of the canonical form (which would orphan
    # every stored build) even when both sides of the comparison above changed together.
    assert a.digest() == "8458b3552db0ded5489a4c64997550acd543140616783de68366f1ca93b0ab16"


def test_digest_changes_with_every_field(make_key: MakeKey) -> None:
    base = make_key()
    variants = dict(
        model_config={"hidden_size": 65},
        weight_fingerprint="other",
        passes=(("fuse_rmsnorm", "uuid-2"), ("paged_attention", "uuid-1")),  # order matters
        buckets=(1, 2),
        dtype="float16",
        device_capability="cuda:8.0",
        torch_version="2.13.0",
        triton_version=None,
        compile_mode="max-autotune",
        format_version=2,
    )
    digests = {base.digest()}
    for name, value in variants.items():
        other = make_key(**{name: value})
        assert base.diff(other) == [name]
        digests.add(other.digest())
    assert len(digests) == len(variants) + 1


def test_int_float_bool_are_distinct(make_key: MakeKey) -> None:
    keys = [make_key(model_config={"x": v}) for v in (1, 1.0, True)]
    assert len({k.digest() for k in keys}) == 3


def test_describe_diff_names_values(make_key: MakeKey) -> None:
    a, b = make_key(), make_key(dtype="float16", model_config={"hidden_size": 64, "extra": 1})
    lines = a.describe_diff(b)
    assert "dtype differs (bfloat16 vs float16)" in lines
    assert any(
        line.startswith("model_config differs (keys: extra, num_layers, rope_theta, tie)") for line in lines
    )


def test_roundtrip_through_dict_keeps_exact_floats(make_key: MakeKey) -> None:
    k = make_key(model_config={"eps": 1e-6, "theta": 0.1 + 0.2, "nested": {"l": [1.5, -0.0]}})
    back = BuildKey.from_dict(k.to_dict())
    assert back == k and back.digest() == k.digest()
    assert back.model_config["theta"] == 0.1 + 0.2


def test_key_is_immutable_after_construction(make_key: MakeKey) -> None:
    cfg = {"hidden_size": 64}
    k = make_key(model_config=cfg)
    before = k.digest()
    cfg["hidden_size"] = 128  # the caller's dict is copied, not aliased
    assert k.digest() == before
    with pytest.raises(TypeError):
        k.model_config["hidden_size"] = 1  # type: ignore[index]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(model_config={"x": object()}),
        dict(model_config={1: "int key"}),
        dict(model_config={"$float": "reserved"}),
        dict(buckets=(1, 1)),
        dict(buckets=(0,)),
        dict(buckets=()),
        dict(buckets=(True,)),
        dict(dtype=""),
        dict(passes=(("only-name",),)),
    ],
)
def test_invalid_fields_are_refused(overrides: dict, make_key: MakeKey) -> None:
    with pytest.raises(InvalidBuildKeyError):
        make_key(**overrides)


def test_current_toolchain_cpu() -> None:
    import torch

    tc = current_toolchain("cpu")
    assert tc.torch_version == torch.__version__
    assert tc.device_capability.startswith("cpu:")
    k = BuildKey.for_current_toolchain(
        model_config={}, weight_fingerprint="w", passes=[], buckets=[1], dtype="float32", device="cpu"
    )
    assert k.torch_version == torch.__version__ and k.device_capability == tc.device_capability


def test_for_current_toolchain_takes_torch_dtype_and_device() -> None:
    """The engine passes its torch.dtype / torch.device; the key records their names."""
    import torch

    common = dict(model_config={"h": 1}, weight_fingerprint="w", passes=[("p", "u")], buckets=[2, 1])
    from_torch = BuildKey.for_current_toolchain(**common, dtype=torch.bfloat16, device=torch.device("cpu"))
    from_names = BuildKey.for_current_toolchain(**common, dtype="bfloat16", device="cpu")
    assert from_torch.dtype == "bfloat16" and from_torch == from_names
