"""The one way step inputs reach the device: a host tensor, pinned on CUDA, copied without blocking."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`; on CUDA from pinned memory (pinned here unless it already is), non-blocking."""
    if device.type != "cuda":
        return host.to(device)
    if not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
