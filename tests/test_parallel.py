"""gemma2np.parallel in one process: the sharding rules, the vocabulary merges and the data-parallel map
(the same code under mpiexec is tested by tests/test_mpi.py)."""
from __future__ import annotations

import numpy as np
import pytest

from gemma2np import Gemma2Config
from gemma2np.kernels import twins
from gemma2np.parallel import (ParallelError, RankError, ShardPlan, SingleProcessComm, even_split, map_windows,
                               merge_argmax, merge_topk)
from gemma2np.parallel.merge import local_argmax, local_topk


def _cfg(H, K, I=48, V=128, D=8, E=96):
    return Gemma2Config(num_attention_heads=H, num_key_value_heads=K, head_dim=D, intermediate_size=I,
                        vocab_size=V, hidden_size=E, num_hidden_layers=2)


def test_even_split():
    assert even_split(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert even_split(2, 3) == [range(0, 1), range(1, 2), range(2, 2)]
    for n in range(0, 20):
        for p in range(1, 6):
            parts = even_split(n, p)
            assert [i for r in parts for i in r] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


SPLITS = [(H, K, N) for H, K in [(4, 2), (4, 4), (2, 1), (8, 2), (8, 4), (32, 16), (6, 3)] for N in (1, 2, 3, 4, 5)]


@pytest.mark.parametrize("H,K,N", SPLITS)
def test_plan_covers_every_head_once_with_consistent_gqa(H, K, N):
    cfg = _cfg(H, K)
    plans = [ShardPlan.from_config(cfg, r, N) for r in range(N)]
    # every query head on exactly one rank, in rank order
    assert [h for p in plans for h in p.q_heads] == list(range(H))
    r = H // K
    for p in plans:
        if not p.has_attention:  # a placeholder rank computes one head of its KV group
            assert N > H and p.n_heads == 1 and p.n_kv_heads == 1
            assert p.compute_heads[0] // r == p.kv_heads[0]
            continue
        assert p.compute_heads == p.q_heads
        # the local GQA ratio is uniform and local query head j uses local kv head j // r_local,
        # which must be the kv head the unsplit model uses for that query head (repeat_interleave)
        assert p.n_heads % p.n_kv_heads == 0
        r_local = p.n_heads // p.n_kv_heads
        for j, h in enumerate(p.q_heads):
            assert p.kv_heads[j // r_local] == h // r
    kv_owners = [p.kv_heads for p in plans]
    if N <= K:  # the KV cache is split exactly: no KV head held twice
        assert [k for ks in kv_owners for k in ks] == list(range(K))
    else:
        assert all(p.n_kv_heads <= 1 for p in plans)
        assert sorted({k for ks in kv_owners for k in ks}) == list(range(K))


@pytest.mark.parametrize("I,N", [(48, 2), (48, 3), (9216, 2), (9216, 3), (36864, 4), (100, 3)])
def test_plan_splits_intermediate_and_vocab(I, N):
    cfg = _cfg(4, 2, I=I, V=257)
    plans = [ShardPlan.from_config(cfg, r, N) for r in range(N)]
    assert [u for p in plans for u in p.ffn] == list(range(I))
    assert [v for p in plans for v in p.vocab] == list(range(257))
    if I % 32 == 0 and I // 32 >= N:  # int8 blocks of down_proj columns never straddle two ranks
        assert all(p.ffn.start % 32 == 0 for p in plans)


def test_plan_errors():
    with pytest.raises(ParallelError, match="intermediate_size"):
        ShardPlan.from_config(_cfg(4, 2, I=2), 0, 3)
    with pytest.raises(ParallelError, match="vocab_size"):
        ShardPlan.from_config(_cfg(4, 2, V=2), 0, 3)
    with pytest.raises(ParallelError):
        ShardPlan.from_config(_cfg(4, 2), 3, 3)
    assert issubclass(ParallelError, ValueError)


@pytest.mark.parametrize("H,K,N", [(4, 2, 2), (4, 2, 3), (2, 1, 3), (4, 4, 3), (2, 2, 5)])
def test_sharded_layer_sums_to_the_unsplit_layer(H, K, N):
    """The sharding rules are the algebra of the split: concatenated row shards are the matrix, and the
    row-parallel partial sums of o_proj / down_proj add up to the unsplit product."""
    rng = np.random.default_rng(0)
    D, E, I = 8, 32, 48
    cfg = _cfg(H, K, I=I, D=D, E=E)
    W = {"model.layers.0.self_attn.q_proj.weight": rng.normal(size=(H * D, E)),
         "model.layers.0.self_attn.k_proj.weight": rng.normal(size=(K * D, E)),
         "model.layers.0.self_attn.o_proj.weight": rng.normal(size=(E, H * D)),
         "model.layers.0.mlp.up_proj.weight": rng.normal(size=(I, E)),
         "model.layers.0.mlp.down_proj.weight": rng.normal(size=(E, I)),
         "lm_head.weight": rng.normal(size=(128, E))}
    plans = [ShardPlan.from_config(cfg, r, N) for r in range(N)]
    sh = {n: [p.shard(n, w) for p in plans] for n, w in W.items()}
    real = [p.has_attention for p in plans]
    q = [s for s, ok in zip(sh["model.layers.0.self_attn.q_proj.weight"], real) if ok]
    np.testing.assert_array_equal(np.concatenate(q, axis=0), W["model.layers.0.self_attn.q_proj.weight"])
    for n in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        np.testing.assert_array_equal(np.concatenate(sh[n], axis=0), W[n])
    for n in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert all(s.flags.c_contiguous for s in sh[n])
        x = rng.normal(size=(3, W[n].shape[1]))
        cols = [p.q_rows if "o_proj" in n else p.ffn_rows for p in plans]
        # (a placeholder rank reads the columns of the head it computes, and its zero shard cancels them)
        partial = sum(x[:, c] @ s.T for c, s in zip(cols, sh[n]))
        np.testing.assert_allclose(partial, x @ W[n].T, rtol=1e-12, atol=1e-12)
    kv = [s for s, p in zip(sh["model.layers.0.self_attn.k_proj.weight"], plans)]
    for s, p in zip(kv, plans):
        np.testing.assert_array_equal(s, W["model.layers.0.self_attn.k_proj.weight"][p.kv_rows])
    # replicated tensors are returned as they are
    norm = np.ones(E)
    assert plans[0].shard("model.layers.0.input_layernorm.weight", norm) is norm
    assert plans[0].rule("model.layers.0.self_attn.o_proj.bias") is None


def _split_last(x, n):
    return [x[..., r.start:r.stop] for r in even_split(x.shape[-1], n)]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_merge_argmax_is_np_argmax(n):
    rng = np.random.default_rng(n)
    cases = [rng.normal(size=(4, 37)).astype(np.float32),
             rng.integers(0, 3, size=(6, 37)).astype(np.float32),          # many ties across shards
             np.full((2, 37), -np.inf, np.float32)]
    nan = rng.normal(size=(5, 37)).astype(np.float32)
    nan[0, 30] = np.nan
    nan[1, [3, 20]] = np.nan
    nan[2, 36] = np.nan
    cases.append(nan)
    for x in cases:
        offsets = [r.start for r in even_split(37, n)]
        cand = [local_argmax(s, o) for s, o in zip(_split_last(x, n), offsets)]
        got = merge_argmax([c[0] for c in cand], [c[1] for c in cand])
        np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


@pytest.mark.parametrize("n,k", [(1, 5), (2, 5), (3, 8), (4, 1), (3, 37)])
def test_merge_topk_is_topk(n, k):
    rng = np.random.default_rng(k)
    for x in (rng.normal(size=(3, 37)).astype(np.float32), rng.integers(0, 4, size=(3, 37)).astype(np.float32)):
        offsets = [r.start for r in even_split(37, n)]
        cand = [local_topk(s, k, o) for s, o in zip(_split_last(x, n), offsets)]
        v, i = merge_topk([c[0] for c in cand], [c[1] for c in cand], k)
        wv, wi = twins.topk(x, k)
        np.testing.assert_array_equal(i, wi)
        np.testing.assert_array_equal(v, wv)


def test_single_process_comm_is_the_identity():
    c = SingleProcessComm()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert c.allreduce_sum(x) is x and c.allgather(x) is x
    assert c.bcast_obj("a") == "a" and c.allgather_obj(1) == [1]
    c.check(True)
    with pytest.raises(RankError, match="rank 0: boom"):
        c.check(False, "boom")


def test_map_windows_single_process():
    c = SingleProcessComm()
    assert map_windows(lambda w: sum(w), [[1, 2], [3], []], c) == [3, 3, 0]
    with pytest.raises(RankError, match="ZeroDivisionError"):
        map_windows(lambda w: 1 / w, [1, 0], c)


def test_tensor_parallel_in_one_process_is_the_plain_model():
    """tensor_parallel=True without mpiexec: the Unsplit hooks, bitwise the plain model (forward and generate)."""
    from gemma2np import Gemma2ForCausalLM
    from gemma2np.parallel.tensor_parallel import Unsplit

    d = "gemma2np/data/gemma2-shakespeare"
    a = Gemma2ForCausalLM.from_pretrained(d, tensor_parallel=True)
    b = Gemma2ForCausalLM.from_pretrained(d)
    assert isinstance(a.tp, Unsplit) and not a.tp.parallel
    ids = np.array([[2, 50, 60, 70, 80]])
    np.testing.assert_array_equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    np.testing.assert_array_equal(a.generate(input_ids=ids, max_new_tokens=5, do_sample=True, seed=1),
                                  b.generate(input_ids=ids, max_new_tokens=5, do_sample=True, seed=1))
