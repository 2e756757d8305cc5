"""Maps sequences onto KV blocks: allocation, growth, freeing and prefix-cache lookups.

Full blocks are identified by a hash chained over every token before them, so a block is
shared only between sequences whose whole prefix up to and including that block is equal.
"""

from __future__ import annotations

import hashlib
import struct

from compiled_serve.engine.block_pool import BlockPool
from compiled_serve.engine.sequence import Sequence

_ROOT_HASH = b"compiled_serve.prefix.v1"


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # prompt tokens found

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def _update_hashes(self, seq: Sequence, num_tokens: int) -> None:
        """Extends seq.block_hashes to cover every full block among its first num_tokens tokens."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_tokens // bs):
            parent = seq.block_hashes[i - 1] if i else _ROOT_HASH
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of seq's longest cached prefix. At least one token is always left to compute,
        because the step that computes it produces the next token's logits."""
        if not self.pool.enable_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._update_hashes(seq, max_blocks * self.block_size)
        hits: list[int] = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Counts one admitted request's lookup (a request that must wait is looked up again)."""
        if self.pool.enable_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_hit_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Makes room for num_new_tokens more tokens after seq's computed (and newly cached) ones.

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        cached_blocks = list(cached_blocks)
        bs = self.block_size
        num_computed = seq.num_computed_tokens + len(cached_blocks) * bs
        total = num_computed + num_new_tokens
        needed = -(-total // bs) - len(seq.block_ids) - len(cached_blocks)
        available = self.pool.num_free_blocks - self.pool.num_free_among(cached_blocks)
        if needed > available:
            return False
        self.pool.touch(cached_blocks)
        seq.block_ids.extend(cached_blocks)
        if needed > 0:
            seq.block_ids.extend(self.pool.allocate(needed))
        if self.pool.enable_caching:
            # Blocks that this step fills are published now; the step writes them before any
            # later step can read them, and within a step every write precedes every read.
            # A token still in flight (asynchronous steps) is not in token_ids yet: the block it
            # completes is hashed and published by the next allocation.
            first = min(num_computed // bs, len(seq.block_hashes))
            known = min(total, seq.num_tokens)
            self._update_hashes(seq, known)
            for i in range(first, known // bs):
                self.pool.register(seq.block_ids[i], seq.block_hashes[i])
        return True

    def free(self, seq: Sequence) -> None:
        self.pool.free(list(reversed(seq.block_ids)))
        seq.block_ids = []
