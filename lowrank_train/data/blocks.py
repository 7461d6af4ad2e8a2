"""Fixed-length blocks of a token stream, sliced on demand, and the train / held-out split of the stream.

The held-out split is the *tail* of the stream (a separate region of the text, never interleaved with training
blocks): ``heldout_block_count`` whole blocks at the end; the training blocks are cut from the start of the rest,
dropping its remainder. :class:`TokenBlocks` reads a block only when it is indexed, so the stream may be a
memmap of any size.

For a tokenizer that puts BOS in front of every text (:func:`~lowrank_train.data.tokenizer.leading_bos_id`), each
block is that BOS followed by ``seq_len - 1`` tokens of the stream: the model sees every sequence as it was trained
to, and the stream itself (and its cache) does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def check_split_settings(seq_len: int, heldout_fraction: float) -> None:
    """Raise a ``ValueError`` unless ``seq_len`` is a positive integer and ``heldout_fraction`` is in ``[0, 1)``."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if not 0.0 <= heldout_fraction < 1.0:  # also false for NaN
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")


def block_stride(seq_len: int, bos: int | None) -> int:
    """Stream tokens one block of ``seq_len`` takes: all of them, or ``seq_len - 1`` after a leading ``bos``."""
    return seq_len if bos is None else seq_len - 1


def heldout_block_count(num_tokens: int, seq_len: int, heldout_fraction: float, *, stride: int | None = None) -> int:
    """Held-out blocks for a stream: ``round(fraction * num_tokens / stride)``, at least one for a positive fraction.

    ``stride`` is the stream tokens one block takes: ``seq_len`` (the default), or ``seq_len - 1`` for blocks that
    start with BOS.

    Raises:
        ValueError: the fraction is outside ``[0, 1)``, ``seq_len`` is not positive, or the stream is too short
            for one training block next to the held-out blocks.
    """
    check_split_settings(seq_len, heldout_fraction)
    stride = seq_len if stride is None else stride
    heldout_blocks = 0
    if heldout_fraction > 0:
        heldout_blocks = max(1, round(heldout_fraction * num_tokens / stride))
    if num_tokens // stride - heldout_blocks < 1:
        raise ValueError(
            f"the corpus has {num_tokens} tokens: too few for one training block of {seq_len} tokens plus "
            f"{heldout_blocks} held-out block(s); use a larger corpus or a shorter seq_len"
        )
    return heldout_blocks


@dataclass(frozen=True, eq=False)  # arrays have no single truth value, so no generated __eq__
class TokenBlocks:
    """``num_blocks`` consecutive blocks of ``seq_len`` tokens starting at ``offset`` in a 1-D token array.

    Indexing reads only the blocks asked for and returns int64 tensors: an ``int`` gives ``(seq_len,)``, a
    slice or an index tensor / array / list gives ``(k, seq_len)``. So a memmap-backed ``TokenBlocks`` stands
    in for an ``(N, seq_len)`` tensor wherever blocks are sliced or gathered (batches, evaluation).

    Attributes:
        tokens: ``(T,)`` token ids of any integer dtype (a ``np.memmap`` or an in-memory array).
        offset: index in ``tokens`` of the first token of block 0.
        num_blocks: blocks in the view.
        seq_len: tokens per block.
        bos: when set, every block is this id followed by the next ``seq_len - 1`` tokens of the stream.
    """

    tokens: np.ndarray
    offset: int
    num_blocks: int
    seq_len: int
    bos: int | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {self.tokens.shape}")
        if self.seq_len <= (0 if self.bos is None else 1) or self.offset < 0 or self.num_blocks < 0:
            raise ValueError(f"invalid blocks: offset {self.offset}, {self.num_blocks} blocks of {self.seq_len}")
        if self.offset + self.num_blocks * self.stride > self.tokens.shape[0]:
            raise ValueError(
                f"{self.num_blocks} blocks of {self.seq_len} from offset {self.offset} run past the "
                f"{self.tokens.shape[0]} tokens"
            )

    @classmethod
    def from_stream(cls, tokens: np.ndarray, seq_len: int, bos: int | None = None) -> TokenBlocks:
        """All whole blocks of a stream from its start (the remainder dropped)."""
        return cls(tokens, 0, tokens.shape[0] // max(1, block_stride(seq_len, bos)), seq_len, bos)

    @property
    def stride(self) -> int:
        """Stream tokens per block: ``seq_len``, or ``seq_len - 1`` when each block starts with ``bos``."""
        return block_stride(self.seq_len, self.bos)

    @property
    def shape(self) -> tuple[int, int]:
        """``(num_blocks, seq_len)``, as the tensor this view stands for."""
        return (self.num_blocks, self.seq_len)

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int | slice | torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        stride = self.stride
        if isinstance(index, slice):
            start, stop, step = index.indices(self.num_blocks)
            if step == 1:
                count = max(0, stop - start)
                first = self.offset + start * stride
                window = self.tokens[first : first + count * stride]
                return self._with_bos(np.array(window, dtype=np.int64).reshape(count, stride))
            index = list(range(start, stop, step))
        if isinstance(index, (int, np.integer)):
            row = int(index) + self.num_blocks if index < 0 else int(index)
            if not 0 <= row < self.num_blocks:
                raise IndexError(f"block {index} out of range for {self.num_blocks} blocks")
            first = self.offset + row * stride
            return self._with_bos(np.array(self.tokens[first : first + stride], dtype=np.int64)[None])[0]
        rows = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        rows = rows.astype(np.int64, copy=False).reshape(-1)
        rows = np.where(rows < 0, rows + self.num_blocks, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_blocks):
            raise IndexError(f"block indices out of range for {self.num_blocks} blocks")
        positions = (self.offset + rows * stride)[:, None] + np.arange(stride)
        return self._with_bos(np.array(self.tokens[positions], dtype=np.int64))

    def _with_bos(self, rows: np.ndarray) -> torch.Tensor:
        if self.bos is None:
            return torch.from_numpy(rows)
        return torch.from_numpy(np.concatenate([np.full((rows.shape[0], 1), self.bos, dtype=np.int64), rows], axis=1))

    def to_tensor(self) -> torch.Tensor:
        """Every block, read into one ``(num_blocks, seq_len)`` int64 tensor."""
        return self[:]


def split_token_blocks(
    tokens: np.ndarray, seq_len: int, heldout_fraction: float, bos: int | None = None
) -> tuple[TokenBlocks, TokenBlocks]:
    """The training and held-out blocks of a ``(T,)`` stream (see :func:`heldout_block_count`); with ``bos``, each
    block is BOS and ``seq_len - 1`` stream tokens."""
    if bos is not None and seq_len < 2:
        raise ValueError(f"blocks that start with BOS need seq_len >= 2, got {seq_len}")
    num_tokens = int(tokens.shape[0])
    stride = block_stride(seq_len, bos)
    heldout_blocks = heldout_block_count(num_tokens, seq_len, heldout_fraction, stride=stride)
    boundary = num_tokens - heldout_blocks * stride
    return (
        TokenBlocks(tokens, 0, boundary // stride, seq_len, bos),
        TokenBlocks(tokens, boundary, heldout_blocks, seq_len, bos),
    )
