"""Server configuration: a frozen dataclass checked on construction; the CLI reads its defaults."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields

from compiled_serve.errors import InvalidParameterError
from compiled_serve.server.reasoning import REASONING_PARSERS
from compiled_serve.server.tool_parsers import TOOL_PARSERS


@dataclass(frozen=True)
class ServerConfig:
    # Loopback by default: binding every interface is an explicit operator choice.
    host: str = "127.0.0.1"
    port: int = 8000
    # With a key set, every endpoint except /health requires `Authorization: Bearer <key>`.
    api_key: str | None = None
    # Names the model answers to; the first is reported by /v1/models. None: the model path
    # (or "SmolLM2-135M-Instruct" for the embedded default).
    served_model_names: tuple[str, ...] | None = None
    # Admission control: requests admitted but not yet running. Beyond this: 503 + Retry-After.
    max_waiting_requests: int = 256
    retry_after_s: int = 1
    # Request size caps.
    max_request_body_bytes: int = 4 * 1024 * 1024
    max_header_count: int = 64
    max_header_bytes: int = 8 * 1024  # one header line (name + value)
    max_total_header_bytes: int = 16 * 1024  # also handed to uvicorn's h11 parser
    # Chat templates: a user-supplied template (request field `chat_template`) is opt-in.
    chat_template_file: str | None = None
    allow_request_chat_template: bool = False
    # Graceful shutdown (SIGINT, SIGTERM): in-flight requests get this long to finish, then are aborted.
    shutdown_timeout_s: float = 2.0
    # How tool calls and reasoning are read from the model's text (server/tool_parsers/, server/reasoning/).
    tool_call_parser: str = "hermes"
    reasoning_parser: str | None = None
    # The engine in its own process (msgpack over a pipe), so HTTP, SSE and detokenization never hold
    # its GIL; False: on a thread of the server process (one model load fewer to wait for in tests).
    engine_process: bool = True
    # Operator logs: one access-log line per request (access_log.py), and an engine throughput line
    # every this many seconds while there is work (stats_log.py; 0: none).
    disable_access_log: bool = False
    log_stats_interval_s: float = 5.0

    def __post_init__(self) -> None:
        checks = [
            ("port", 0 <= self.port <= 65535, "must be in 0..65535"),
            ("max_waiting_requests", self.max_waiting_requests >= 0, "must be >= 0"),
            ("retry_after_s", self.retry_after_s >= 1, "must be >= 1"),
            ("max_request_body_bytes", self.max_request_body_bytes >= 1024, "must be >= 1024"),
            ("max_header_count", self.max_header_count >= 8, "must be >= 8"),
            ("max_header_bytes", self.max_header_bytes >= 256, "must be >= 256"),
            ("max_total_header_bytes", self.max_total_header_bytes >= self.max_header_bytes,
             "must be >= max_header_bytes"),
            ("shutdown_timeout_s", self.shutdown_timeout_s >= 0, "must be >= 0"),
            ("log_stats_interval_s", self.log_stats_interval_s >= 0, "must be >= 0"),
            ("api_key", self.api_key is None or len(self.api_key) > 0, "must not be empty"),
            ("tool_call_parser", self.tool_call_parser in TOOL_PARSERS, f"must be one of {sorted(TOOL_PARSERS)}"),
            ("reasoning_parser", self.reasoning_parser is None or self.reasoning_parser in REASONING_PARSERS,
             f"must be one of {sorted(REASONING_PARSERS)}"),
            ("served_model_names", self.served_model_names is None or len(self.served_model_names) > 0,
             "must name at least one model"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise InvalidParameterError(name, f"{message}, got {getattr(self, name)!r}")

    @property
    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    @classmethod
    def field_defaults(cls) -> dict[str, object]:
        return {f.name: f.default for f in fields(cls)}
