"""The pool of fixed-size KV blocks: reference counts, an LRU free list and the prefix-cache map.

A freed block keeps its hash and stays findable until it is handed out again, so a later
request with the same prefix can revive it. Blocks are handed out from the front of the free
list (least recently freed first); freeing appends to the back.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def allocate(self, count: int) -> list[int]:
        """Hands out `count` blocks (ref count 1), evicting their old cache entries."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} blocks with {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            old = self.block_hash[block_id]
            if old is not None:
                if self._cached.get(old) == block_id:
                    del self._cached[old]
                self.block_hash[block_id] = None
            self.ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def touch(self, block_ids: list[int]) -> None:
        """Takes a reference on cached blocks (reviving them from the free list if needed)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._free[block_id]
            self.ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drops a reference; blocks that reach zero go to the back of the free list.

        Callers pass blocks tail-first, so a sequence's last blocks are evicted before its
        first ones (a shared prefix outlives the suffixes built on it).
        """
        for block_id in block_ids:
            if self.ref_counts[block_id] <= 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free[block_id] = None

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Publishes a full block under its chained hash (the first block with a hash wins)."""
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return
        self.block_hash[block_id] = block_hash
        self._cached.setdefault(block_hash, block_id)

    def num_free_among(self, block_ids: list[int]) -> int:
        return sum(1 for b in block_ids if self.ref_counts[b] == 0)
