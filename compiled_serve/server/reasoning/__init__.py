"""Reasoning parsers, chosen with `--reasoning-parser`; they run before the tool parser,
which sees only the content they leave."""

from __future__ import annotations

from compiled_serve.server.reasoning.think import REASONING_PARSERS, ReasoningSplit, ThinkReasoningParser

__all__ = ["REASONING_PARSERS", "ReasoningSplit", "ThinkReasoningParser"]
