"""Where the tensor-parallel ranks' sockets bind: one named network interface, loopback by default.

There is no TCP rendezvous: the ranks meet through a FileStore in a private directory. What does
open sockets is the collective backend: gloo's pair sockets (CPU) and NCCL's bootstrap and socket
transport (CUDA). Each binds to the interface named by GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME.
`EngineConfig.distributed_interface` (`--distributed-interface`) is their one source:

  - "lo" (the default): every rank's socket on 127.0.0.1, reachable from this machine only;
  - another name binds there, and only when named this way. The traffic is unauthenticated and
    unencrypted (as vLLM's is): such an interface must be on a private network.

Either variable already set in the environment to something else is refused rather than
followed, so an inherited setting cannot move the traffic off loopback unnoticed. Every rank
still runs on this machine: multi-node runs (ranks on other hosts) are not supported.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
from collections.abc import Mapping

from compiled_serve.errors import InvalidParameterError

logger = logging.getLogger("compiled_serve.engine")

LOOPBACK = "lo"
SOCKET_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def ipv4_address(interface: str) -> str | None:
    """The interface's IPv4 address, or None (none, or not Linux)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", interface[:15].encode()))
    except OSError:
        return None
    return socket.inet_ntoa(packed[20:24])


def socket_env(interface: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME for every rank, naming `interface` (checked)."""
    names = [name for _, name in socket.if_nameindex()]
    if interface not in names:
        raise InvalidParameterError("distributed_interface", f"this machine has no network interface "
                                    f"{interface!r} (it has: {', '.join(names)})")
    for var in SOCKET_ENV:
        if environ.get(var, interface) != interface:
            raise InvalidParameterError(
                "distributed_interface", f"{var}={environ[var]} in the environment names another interface than "
                f"distributed_interface {interface!r}; the ranks bind only where --distributed-interface "
                f"says: pass --distributed-interface {environ[var]} to use it, or unset {var}")
    return {var: interface for var in SOCKET_ENV}


def apply_socket_env(interface: str) -> dict[str, str | None]:
    """Sets the variables in this process (checked first); returns what they were, for
    `restore_socket_env` once its process group is gone (so that a later engine in this process
    is not refused for a value this one set)."""
    before = {var: os.environ.get(var) for var in SOCKET_ENV}
    os.environ.update(socket_env(interface))
    return before


def restore_socket_env(before: Mapping[str, str | None]) -> None:
    for var, value in before.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


def warn_if_not_loopback(interface: str) -> None:
    if interface != LOOPBACK:
        logger.warning("tensor parallel: the ranks' sockets bind to %s (%s), not loopback; this traffic is "
                       "unauthenticated: keep that interface on a private network", interface,
                       ipv4_address(interface) or "no IPv4 address")
