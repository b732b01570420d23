import numpy as np
import pytest

from gemma2np import Gemma2Config
from gemma2np.kernels import native_available

# backends the model can run on: the pure-NumPy reference always, the C/Cython one when it is built
# (.ci/run checks that it is built, so in CI both always run)
BACKENDS = ["numpy"] + (["native"] if native_available() else [])


def tiny_config(**overrides) -> Gemma2Config:
    """A small config in which every feature bites (GQA, window < sequence, scalar != head_dim, softcaps)."""
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=20, sliding_window=4,
              max_position_embeddings=64, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
              initializer_range=0.3)
    kw.update(overrides)
    return Gemma2Config(**kw)


def randomize_norms(state: dict, seed: int = 0) -> dict:
    """Fresh models have zero norm weights (scale 1 + 0): randomise them so 1 + w is exercised."""
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(0, 0.5, v.shape).astype(np.float32) if "norm" in k else v) for k, v in state.items()}


@pytest.fixture
def tiny():
    return tiny_config()
