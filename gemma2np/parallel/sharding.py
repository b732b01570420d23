"""Which slice of each weight a rank holds (Megatron-style tensor parallelism).

One decoder layer, split over N ranks:

    attention   q_proj rows, k_proj / v_proj rows of the rank's heads ("column-parallel": no
                communication), attention over those heads only (its KV cache holds only them), then
                the matching COLUMNS of o_proj ("row-parallel": a partial sum of the full output)
                -> one allreduce
    MLP         gate_proj / up_proj rows of the rank's intermediate units, the matching columns of
                down_proj -> one allreduce
    LM head     rows of the rank's vocabulary range; the softcap is element-wise, so each rank caps
                its own logits; argmax / top-k / sampling are merged across ranks (parallel.merge)
    replicated  the RMSNorm weights, the o_proj bias (added once, after the allreduce), the
                classification heads; the embedding table is read row by row with pread (never made
                resident), so each rank looks up the full hidden vector of its tokens itself

How heads are split (uneven splits work; none is an error unless a rank would get no MLP or
vocabulary rows, i.e. more ranks than intermediate_size or vocab_size):
  * N <= num_key_value_heads: the KV heads are split into N contiguous groups as evenly as possible
    (the first K mod N ranks get one more); each rank takes the query heads of its KV heads, so the
    KV cache is split exactly (no KV head is held twice).
  * N > num_key_value_heads (e.g. 3 ranks, 2 KV heads): the ranks are split into K contiguous blocks,
    block g serves KV head g, and the r = H / K query heads of that group are split over the block's
    ranks. That KV head (its k/v rows and its cache) is then replicated on the ranks of the block, as
    vLLM does. A rank left with no query head (N > H, e.g. 3 ranks for 2 heads) computes one
    placeholder head (a copy of its group's first head) whose o_proj columns are zeros, so its
    partial sum is exactly zero and the decoder needs no special case; its probabilities are left
    out of output_attentions.
  Either way every rank's query heads use their KV heads in repeat_interleave order with one
  uniform local ratio, so the attention code runs unchanged on the local head counts.

Intermediate units are split in granules of 32 when intermediate_size allows it, so the int8
blocks (32 consecutive inputs of down_proj) of every shard are the blocks of the unsplit matrix and
int8 tensor parallelism quantises exactly as one process does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checkpoint import release_pages
from .comm import ParallelError

__all__ = ["ShardPlan", "even_split", "GRANULE"]

GRANULE = 32  # = the default int8 block (kernels.twins.DEFAULT_INT8_BLOCK), see the module doc


def even_split(n: int, parts: int) -> list[range]:
    """n items in `parts` contiguous ranges, sizes differing by at most one, larger ones first
    (np.array_split's rule)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


@dataclass(frozen=True)
class ShardPlan:
    """The slices of rank `rank` of `size`. Ranges are global indices (heads, units, vocab rows)."""

    rank: int
    size: int
    head_dim: int
    q_heads: range      # the query heads this rank contributes (empty: a placeholder rank, see above)
    kv_heads: range     # the KV heads it holds (and caches)
    compute_heads: range  # the query heads it computes: q_heads, or one placeholder head
    ffn: range
    vocab: range
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config, rank: int, size: int) -> "ShardPlan":
        H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        if not (isinstance(size, int) and size >= 1 and 0 <= rank < size):
            raise ParallelError(f"bad rank {rank!r} of world size {size!r}")
        r = H // K
        if size <= K:
            kv = even_split(K, size)[rank]
            q = range(kv.start * r, kv.stop * r)
        else:
            blocks = even_split(size, K)  # ranks serving each KV head
            g = next(i for i, b in enumerate(blocks) if rank in b)
            part = even_split(r, len(blocks[g]))[rank - blocks[g].start]
            q = range(g * r + part.start, g * r + part.stop)
            kv = range(g, g + 1)
        I, V = config.intermediate_size, config.vocab_size
        if I < size:
            raise ParallelError(f"cannot split intermediate_size {I} over {size} ranks (one unit per rank at least)")
        if V < size:
            raise ParallelError(f"cannot split vocab_size {V} over {size} ranks (one row per rank at least)")
        g = GRANULE if I % GRANULE == 0 and I // GRANULE >= size else 1
        units = even_split(I // g, size)[rank]
        ffn = range(units.start * g, units.stop * g)
        vocab = even_split(V, size)[rank]
        compute = q if len(q) else range(kv.start * r, kv.start * r + 1)
        return cls(rank, size, D, q, kv, compute, ffn, vocab, H, K, I, V)

    # ------------------------------------------------------------------ local sizes
    @property
    def n_heads(self) -> int:  # query heads the layer computes on this rank (>= 1)
        return len(self.compute_heads)

    @property
    def n_kv_heads(self) -> int:
        return len(self.kv_heads)

    @property
    def has_attention(self) -> bool:
        return len(self.q_heads) > 0

    # ------------------------------------------------------------------ slices of the weight matrices
    @property
    def q_rows(self) -> slice:  # rows of q_proj (and, unless a placeholder, columns of o_proj)
        return slice(self.compute_heads.start * self.head_dim, self.compute_heads.stop * self.head_dim)

    @property
    def kv_rows(self) -> slice:
        return slice(self.kv_heads.start * self.head_dim, self.kv_heads.stop * self.head_dim)

    @property
    def ffn_rows(self) -> slice:
        return slice(self.ffn.start, self.ffn.stop)

    @property
    def vocab_rows(self) -> slice:
        return slice(self.vocab.start, self.vocab.stop)

    def rule(self, name: str):
        """How the tensor `name` (an HF name) is split: ("rows", slice) | ("cols", slice) | None
        (replicated)."""
        parts = name.split(".")
        leaf = parts[-2] if len(parts) >= 2 else ""
        kind = parts[-1]
        if leaf == "q_proj":
            return ("rows", self.q_rows)
        if leaf in ("k_proj", "v_proj"):
            return ("rows", self.kv_rows)
        if leaf == "o_proj":
            return ("cols", self.q_rows) if kind == "weight" else None
        if leaf in ("gate_proj", "up_proj"):
            return ("rows", self.ffn_rows)
        if leaf == "down_proj":
            return ("cols", self.ffn_rows)
        if leaf == "lm_head":
            return ("rows", self.vocab_rows)
        return None

    def shard(self, name: str, a: np.ndarray) -> np.ndarray:
        """This rank's part of tensor `name`. Row slices of a memory-mapped tensor stay views of the
        map (only those pages are ever read); a column slice is copied into a contiguous array (the
        kernels need rows contiguous), reading only the pages that hold its columns, which are then
        released from the resident set."""
        rule = self.rule(name)
        if rule is None:
            return a
        how, sl = rule
        if how == "rows":
            return a[sl]
        if a.ndim != 2:
            raise ParallelError(f"{name}: expected a 2-D weight to split by columns, got shape {a.shape}")
        if not self.has_attention and self.rule(name) == ("cols", self.q_rows) and ".o_proj." in name:
            # placeholder head: zero columns, an exactly zero partial sum (x * 0 = +-0 adds nothing)
            return np.zeros((a.shape[0], sl.stop - sl.start), a.dtype)
        if hasattr(a, "column_slice"):
            # a quantized GGUF tensor (gguf_quant): its whole blocks of those columns (still quantized) when
            # the split falls on block boundaries, else those columns dequantized (float32)
            return a.column_slice(sl)
        out = np.empty((a.shape[0], sl.stop - sl.start), a.dtype)
        step = max(1, (16 << 20) // max(1, a.shape[1] * a.dtype.itemsize))  # 16 MB of rows at a time
        for r0 in range(0, a.shape[0], step):
            out[r0:r0 + step] = a[r0:r0 + step, sl]
            release_pages(a[r0:r0 + step])
        return out

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.size}: query heads {_fmt(self.q_heads)}"
                f"{'' if self.has_attention else ' (one placeholder head)'}, KV heads {_fmt(self.kv_heads)}, "
                f"intermediate {_fmt(self.ffn)}, vocab {_fmt(self.vocab)}")


def _fmt(r: range) -> str:
    return f"[{r.start}, {r.stop})" if len(r) else "none"
