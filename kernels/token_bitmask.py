"""Grammar token bitmasks: `compiled_serve::token_bitmask(logits, bitmask) -> masked logits`.

A bitmask row holds one bit per token, little-endian within int32 words: token t is allowed when
bit (t % 32) of word t // 32 is set. `bitmask` is int32 [N, ceil(V/32)] (llguidance's and
xgrammar's layout); a row of all ones (-1 words) allows everything. Masked tokens become -inf.

The reference unpacks the words with one broadcast shift ([N, W, 32] -> [N, V]), no loop over
the vocabulary. On CUDA a Triton kernel does the same in one pass over the logits (one program
per (row, BLOCK tokens) tile); `logits_tail` (kernels/logits_tail.py) calls this op on the raw
logits, so with a bitmask every later stage, logprobs included, sees the masked row (as vLLM's).
"""

from __future__ import annotations

import torch

_BITS = 32


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return -(-vocab_size // _BITS)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, ceil(V/32)] int32 -> [N, V] bool, True where the token is allowed."""
    shifts = torch.arange(_BITS, dtype=torch.int32, device=bitmask.device)  # [32]
    bits = (bitmask.int()[:, :, None] >> shifts) & 1  # [N, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size] != 0


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """[N, V] float32 copy of `logits` with -inf on the tokens `bitmask` [N, W] disallows."""
    allowed = allowed_tokens(bitmask, logits.shape[-1])
    return torch.where(allowed, logits.float(), float("-inf"))


def check_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    expected = (logits.shape[0], bitmask_width(logits.shape[-1]))
    if tuple(bitmask.shape) != expected or bitmask.dtype != torch.int32:
        raise ValueError(f"token_bitmask: bitmask must be int32 {expected}, got {bitmask.dtype} "
                         f"{tuple(bitmask.shape)}")


@torch.library.custom_op("compiled_serve::token_bitmask", mutates_args=())
def token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [N, V], bitmask int32 [N, ceil(V/32)] -> float32 [N, V] with -inf where masked."""
    check_bitmask(logits, bitmask)
    return apply_token_bitmask_reference(logits, bitmask)


@token_bitmask.register_kernel("cuda")
def _(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    from compiled_serve.kernels.triton_token_bitmask import apply_token_bitmask_triton

    check_bitmask(logits, bitmask)
    return apply_token_bitmask_triton(logits, bitmask)


@token_bitmask.register_fake
def _(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    check_bitmask(logits, bitmask)
    return logits.new_empty(logits.shape, dtype=torch.float32)
