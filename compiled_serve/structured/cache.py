"""GrammarCache: compiled grammars by spec, bounded in entries and in bytes (least recently used
goes first). Thread-safe: the server's compile workers and the engine thread share one."""

from __future__ import annotations

import threading
from collections import OrderedDict

from compiled_serve.structured.backend import CompiledGrammar

DEFAULT_MAX_ENTRIES = 256
DEFAULT_MAX_BYTES = 64 * 2**20


class GrammarCache:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("a grammar cache needs room for at least one entry and one byte")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CompiledGrammar | None:
        with self._lock:
            grammar = self._entries.get(key)
            if grammar is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return grammar

    def put(self, key: str, grammar: CompiledGrammar) -> None:
        """Keeps `grammar` unless it alone is over the byte bound (then it is used once, uncached)."""
        if grammar.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._entries[key] = grammar
            self.nbytes += grammar.nbytes
            while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
