"""Rotary position embeddings (RoPE) for Gemma 2, in NumPy, as transformers 5.23 computes them.

Ground truth: ``transformers/modeling_rope_utils.py`` (``ROPE_INIT_FUNCTIONS``, ``dynamic_rope_update``,
``RotaryEmbeddingConfigMixin``) and ``Gemma2RotaryEmbedding`` / ``rotate_half`` / ``apply_rotary_pos_emb`` in
``models/gemma2/modeling_gemma2.py``.

Numerics (float32 mode, the default) -- the point of this module is to reproduce *torch's* float32 arithmetic:

* Every tensor op HF performs in float32 is done here in float32, with Python scalars rounded to float32 *before*
  the op, because that is what torch does when a Python number meets a float32 tensor (the scalar becomes an
  operand of the tensor's dtype).
* ``c / t`` with a Python number ``c`` is ``t.reciprocal() * c`` in torch (``Tensor.__rdiv__``), which rounds
  twice; we do the same (``_rdiv``). ``t / c`` is a true float32 division.
* ``base ** e`` (float32 pow): torch's scalar path is libm ``powf`` (correctly rounded in glibc >= 2.28); we get the
  same by computing in float64 and rounding once. torch's *vectorised* AVX512/AVX2 path (Sleef, 1-ulp accuracy)
  differs from this by 1 ulp in ~1% of the elements, and which ones depends on the CPU, so bit-identity with HF is
  not a well-defined target: we take the correctly rounded value (platform independent) and the tests bound the
  consequence (<= 1 ulp on inv_freq, ~pos * ulp(inv_freq) on the angle).
* cos/sin: computed as float64 ``cos`` of the float32 angle, rounded once to float32 (correctly rounded; torch's
  Sleef cos/sin are within 1 ulp of that, measured max |diff| 6e-8).
* HF computes dynamic NTK twice over with *different* arithmetic: at construction ``seq_len`` is a Python int and
  the new base is computed in float64 Python math; during ``forward`` ``seq_len = max(position_ids) + 1`` is an
  int64 tensor, so the base is computed in float32 tensor math. ``compute_inv_freq`` mirrors this: a Python ``int``
  seq_len takes the Python-float path, a NumPy integer (``np.int64(...)`` / 0-d array) takes the tensor path, which
  is what ``RotaryEmbedding`` passes.

float64 mode (``dtype=np.float64``) is a "ground truth" mode: the same formulas evaluated in float64 throughout (no
float32 rounding anywhere), for measuring how far float32 RoPE is from the exact rotation.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

# rope_type values transformers 5.23 can build for Gemma 2: "default" is Gemma2RotaryEmbedding's own
# compute_default_rope_parameters; the others are the keys of ROPE_INIT_FUNCTIONS, all of which Gemma2RotaryEmbedding
# accepts ("proportional" included: it is in ROPE_INIT_FUNCTIONS, needs only rope_theta, and works for Gemma 2).
# "axial" has a validator in transformers but no init function, so Gemma2RotaryEmbedding raises KeyError on it.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")

# Keys each type requires / optionally accepts, copied from RotaryEmbeddingConfigMixin._validate_<type>_rope_parameters.
# partial_rotary_factor is optional for all of them (_check_received_keys adds it). We additionally require
# rope_theta everywhere because the init functions index rope_parameters["rope_theta"] unconditionally (HF's
# standardize_rope_params always fills it in; see docs in the module report / config engineer).
_REQUIRED = {
    "default": {"rope_type"},
    "linear": {"rope_type", "factor"},
    "dynamic": {"rope_type", "factor"},
    "yarn": {"rope_type", "factor", "original_max_position_embeddings"},
    "longrope": {"rope_type", "short_factor", "long_factor", "original_max_position_embeddings"},
    "llama3": {"rope_type", "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
               "rope_theta"},
    "proportional": {"rope_type", "rope_theta"},
}
_OPTIONAL = {
    "default": {"rope_theta"},
    "linear": {"rope_theta"},
    "dynamic": {"rope_theta"},
    "yarn": {"rope_theta", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"},
    "longrope": {"rope_theta", "attention_factor", "factor"},
    "llama3": set(),
    # proportional reads `factor` (defaults 1.0) though HF's validator does not list it: it would warn
    # "Unrecognized keys" for it, and so do we (no entry here).
    "proportional": set(),
}


def _rope_type(rope_parameters: dict) -> str:
    # BC: old configs say "type"; HF's standardize does setdefault("rope_type", params.get("type", "default")),
    # so an explicit "rope_type" wins over "type".
    return rope_parameters.get("rope_type", rope_parameters.get("type", "default"))


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def validate_rope_parameters(rope_parameters: dict, head_dim: int, max_position_embeddings: int | None = None) -> None:
    """Check a standardized ``rope_parameters`` dict the way transformers 5.23 does.

    Raises ValueError where transformers raises (missing required keys -- HF raises KeyError there --, a fully
    rotated odd head_dim > 4) and where transformers would fail later when building or running the rotary
    embedding (unknown rope_type: KeyError in Gemma2RotaryEmbedding.__init__; a non-numeric factor for
    linear/dynamic/llama3: TypeError in the init function; short/long_factor of the wrong length: HF only warns at
    config time, then fails with a broadcast error in longrope's init -- or silently broadcasts a length-1 list).
    Everything transformers only logs is a ``warnings.warn`` here. ``max_position_embeddings`` enables the two
    checks that need it (yarn's implicit factor, llama3's original < max).
    """
    if not isinstance(rope_parameters, dict):
        raise ValueError(f"rope_parameters must be a dict, got {type(rope_parameters).__name__}")
    rope_type = _rope_type(rope_parameters)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"Unknown rope_type {rope_type!r}; supported for Gemma 2: {ROPE_TYPES}")

    # _check_received_keys: "type" counts as "rope_type"; partial_rotary_factor always optional.
    received = set(rope_parameters)
    if "type" in received:
        received = (received - {"type"}) | {"rope_type"}
    required = set(_REQUIRED[rope_type])
    optional = set(_OPTIONAL[rope_type]) | {"partial_rotary_factor"}
    missing = (required | {"rope_theta"}) - received
    if missing:
        raise ValueError(
            f"Missing required keys in `rope_parameters` for 'rope_type'='{rope_type}': {sorted(missing)}")
    unused = received - required - optional
    if unused:
        warnings.warn(f"Unrecognized keys in `rope_parameters` for 'rope_type'='{rope_type}': {sorted(unused)}")

    theta = rope_parameters["rope_theta"]
    if not _is_number(theta) or theta <= 0:
        # HF does not check this; a non-number crashes the init function, <= 0 gives NaN frequencies.
        raise ValueError(f"`rope_parameters`'s rope_theta must be a positive number, got {theta!r}")

    def check_factor(required_number: bool):
        factor = rope_parameters.get("factor")
        if required_number and not _is_number(factor):
            # HF warns, then the init function does `inv_freq /= factor` or `factor * ...` and raises TypeError.
            raise ValueError(f"`rope_parameters`'s factor field must be a float or int >= 1, got {factor!r}")
        if factor is not None and (not _is_number(factor) or factor < 1.0):
            warnings.warn(f"`rope_parameters`'s factor field must be a float or int >= 1, got {factor}")

    if rope_type in ("linear", "dynamic", "llama3"):
        check_factor(required_number=True)
    elif rope_type == "yarn":
        # factor=None is allowed by the yarn init (it falls back to max_position_embeddings / original).
        factor = rope_parameters["factor"]
        if factor is None or not _is_number(factor) or factor < 1.0:
            warnings.warn(f"`rope_parameters`'s factor field must be a float or int >= 1, got {factor}")
        if factor is not None and not _is_number(factor):
            raise ValueError(f"`rope_parameters`'s factor field must be a number, got {factor!r}")
        af = rope_parameters.get("attention_factor")
        # HF insists on a float (an int warns) here, unlike longrope; mirrored.
        if af is not None and (not isinstance(af, (float, np.floating)) or af < 0):
            warnings.warn(f"`rope_parameters`'s attention_factor field must be a float greater than 0, got {af}")
        for key in ("beta_fast", "beta_slow"):
            v = rope_parameters.get(key)
            if v is not None and not _is_number(v):
                warnings.warn(f"`rope_parameters`'s {key} field must be a float or int, got {v}")
        bf, bs = rope_parameters.get("beta_fast"), rope_parameters.get("beta_slow")
        if _is_number(bf or 32) and _is_number(bs or 1) and (bf or 32) < (bs or 1):
            warnings.warn(f"`rope_parameters`'s beta_fast field must be greater than beta_slow, got beta_fast={bf} "
                          f"(defaults to 32 if None) and beta_slow={bs} (defaults to 1 if None)")
        orig = rope_parameters["original_max_position_embeddings"]
        if not _is_number(orig) or orig <= 0:
            raise ValueError(f"original_max_position_embeddings must be a positive integer, got {orig!r}")
        if max_position_embeddings is not None and factor is not None:
            implicit = max_position_embeddings / orig
            if implicit != factor and implicit != 1:
                warnings.warn(f"The explicitly set RoPE scaling factor ({factor}) does not match "
                              f"max_position_embeddings / original_max_position_embeddings = {implicit}; "
                              "YaRN uses the explicit factor.")
    elif rope_type == "longrope":
        prf = rope_parameters.get("partial_rotary_factor", 1.0)
        dim = int(head_dim * prf)
        n = len(range(0, dim, 2))  # length of longrope's arange(0, dim, 2) (== dim // 2 for even dim)
        for key in ("short_factor", "long_factor"):
            v = rope_parameters[key]
            if not (isinstance(v, (list, tuple)) and all(_is_number(x) for x in v)):
                raise ValueError(f"`rope_parameters`'s {key} field must be a list of numbers, got {v!r}")
            if len(v) != dim // 2 or len(v) != n:
                raise ValueError(f"`rope_parameters`'s {key} field must have length {dim // 2} "
                                 f"(rotary dim {dim} / 2), got {len(v)}")
        factor = rope_parameters.get("factor")
        orig = rope_parameters["original_max_position_embeddings"]
        if not _is_number(orig) or orig <= 0:
            raise ValueError(f"original_max_position_embeddings must be a positive integer, got {orig!r}")
        if factor is None:
            # HF: warning_once recommending `factor`; the init falls back to max_position_embeddings / original.
            warnings.warn("longrope `rope_parameters` without `factor`: the scaling factor will be "
                          "max_position_embeddings / original_max_position_embeddings; prefer setting `factor`.")
        elif not _is_number(factor) or factor < 1.0:
            warnings.warn(f"`rope_parameters`'s factor field must be a float or int >= 1, got {factor}")
        af = rope_parameters.get("attention_factor")
        if af is not None and (not _is_number(af) or af < 0.0):
            warnings.warn(f"`rope_parameters`'s attention_factor field must be a float or int greater than 0, "
                          f"got {af}")
    if rope_type == "llama3":
        lo, hi = rope_parameters["low_freq_factor"], rope_parameters["high_freq_factor"]
        if not _is_number(lo) or not _is_number(hi):
            # HF warns, then `high_freq_factor <= low_freq_factor` raises TypeError on None.
            raise ValueError(f"low_freq_factor / high_freq_factor must be numbers, got {lo!r} / {hi!r}")
        if hi <= lo:
            # HF only warns, but hi == lo makes the smoothing divide by zero (NaN-free only if no medium band).
            warnings.warn(f"`rope_parameters`'s high_freq_factor field must be greater than low_freq_factor, got "
                          f"high_freq_factor={hi} and low_freq_factor={lo}")
        orig = rope_parameters["original_max_position_embeddings"]
        if not isinstance(orig, (int, np.integer)) or isinstance(orig, bool):
            warnings.warn(f"`rope_parameters`'s original_max_position_embeddings field must be an integer, "
                          f"got {orig}")
        if max_position_embeddings is not None and _is_number(orig) and orig >= max_position_embeddings:
            warnings.warn("`rope_parameters`'s original_max_position_embeddings field must be less than "
                          f"max_position_embeddings, got {orig} and max_position_embeddings={max_position_embeddings}")
    if rope_type == "proportional" and rope_parameters.get("partial_rotary_factor") is None:
        warnings.warn("`rope_parameters`'s partial_rotary_factor is None. This will default to 1.0 in the "
                      "computation, making this equivalent to the linear_scaling RoPE type.")
    if rope_type == "proportional" and not _is_number(rope_parameters.get("factor", 1.0)):
        raise ValueError(f"`rope_parameters`'s factor must be a number, got {rope_parameters.get('factor')!r}")

    # validate_rope's even-dimension check, verbatim: an odd fully rotated head_dim > 4 is an error.
    prf = rope_parameters.get("partial_rotary_factor", 1.0)
    if head_dim > 4 and head_dim % 2 and int(head_dim * prf) == head_dim:
        raise ValueError(f"RoPE requires an even rotary dimension, but got `head_dim`={head_dim} with "
                         f"`partial_rotary_factor`={prf}.")
    if rope_type not in ("default", "proportional") and int(head_dim * prf) != head_dim:
        # Not a transformers check: these init functions then return fewer than head_dim // 2 frequencies and
        # Gemma 2's apply_rotary_pos_emb fails with a broadcast error (it has no pass-through part).
        warnings.warn(f"partial_rotary_factor={prf} with rope_type={rope_type!r} gives a rotary dim of "
                      f"{int(head_dim * prf)} < head_dim={head_dim}; Gemma 2's attention cannot apply it.")


# ----------------------------------------------------------------------------------------------------------------
# float32 helpers reproducing torch's semantics (see module docstring)

def _s(x, dt):
    """A Python scalar as torch sees it next to a tensor of dtype dt: rounded to dt first."""
    return dt.type(x)


def _pow(base, expo, dt):
    # float32: correctly rounded powf (== libm powf == torch's scalar path); float64: plain float64 pow.
    base = _s(base, dt)
    if dt == np.float32:
        return np.power(np.float64(base), expo.astype(np.float64)).astype(np.float32)
    return np.power(base, expo)


def _rdiv(c, t, dt):
    # torch: `c / t` == `t.reciprocal() * c` (two roundings in float32). In float64 mode the same two steps are
    # kept (the difference from a single division is ~1e-16, irrelevant for a ground-truth mode, and keeping the
    # structure identical keeps the code readable).
    return (dt.type(1.0) / t) * _s(c, dt)


def _exponents(n_end, denom, dt, int_arange=True):
    # arange(0, n_end, 2) cast to float, divided by `denom` in float (torch: tensor / Python int -> float op).
    # int_arange vs float arange give identical values for these small ints; the flag documents which HF uses.
    a = np.arange(0, n_end, 2, dtype=np.int64).astype(dt) if int_arange else np.arange(0, n_end, 2, dtype=dt)
    return a / _s(denom, dt)


def compute_inv_freq(rope_parameters: dict, head_dim: int, max_position_embeddings: int,
                     seq_len: int | np.integer | np.ndarray | None = None, dtype=np.float32) -> tuple[np.ndarray, float]:
    """inv_freq and attention_scaling for one standardized ``rope_parameters`` dict, like HF's init functions.

    Returns ``(inv_freq, attention_scaling)``: inv_freq of ``dtype`` (float32 by default) with one entry per rotated
    pair (``head_dim // 2`` for Gemma 2's default init), attention_scaling a Python float.

    ``seq_len`` only matters for "dynamic" (grown base) and "longrope" (long factors if > original). A Python int
    follows HF's construction-time arithmetic; a NumPy integer scalar or 0-d array follows HF's forward-time
    arithmetic (seq_len is a tensor there; for dynamic this means float32 math for the new base).
    """
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    rope_type = _rope_type(rope_parameters)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"Unknown rope_type {rope_type!r}; supported for Gemma 2: {ROPE_TYPES}")
    p = rope_parameters
    base = p["rope_theta"]
    prf = p.get("partial_rotary_factor", 1.0)
    one = dt.type(1.0)

    if rope_type == "default":
        # Gemma2RotaryEmbedding.compute_default_rope_parameters: dim = head_dim (partial_rotary_factor IGNORED),
        # float arange (not int64), 1.0 / (base ** (arange / dim)).
        dim = head_dim
        return _rdiv(1.0, _pow(base, _exponents(dim, dim, dt, int_arange=False), dt), dt), 1.0

    if rope_type == "proportional":
        # _compute_proportional_rope_parameters: exponents over head_dim (not the rotary dim), the NoPE tail gets
        # inv_freq 0 (cos 1, sin 0: identity), then /= factor (default 1.0).
        rope_angles = int(prf * head_dim // 2)
        inv = _rdiv(1.0, _pow(base, _exponents(2 * rope_angles, head_dim, dt), dt), dt)
        nope = head_dim // 2 - rope_angles
        if nope > 0:
            inv = np.concatenate([inv, np.zeros(nope, dtype=dt)])
        return inv / _s(p.get("factor", 1.0), dt), 1.0

    dim = int(head_dim * prf)

    if rope_type == "linear":
        inv = _rdiv(1.0, _pow(base, _exponents(dim, dim, dt), dt), dt)
        return inv / _s(p["factor"], dt), 1.0   # `inv_freq /= factor`: a true float32 division

    if rope_type == "dynamic":
        factor = p["factor"]
        if seq_len is None or isinstance(seq_len, (int,)) and not isinstance(seq_len, bool):
            # Python path (construction): seq_len = max(seq_len, max_pos); new base in float64 Python math.
            s = max_position_embeddings if seq_len is None else max(int(seq_len), max_position_embeddings)
            new_base = base * ((factor * s / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        else:
            # Tensor path (forward): seq_len is an int64 tensor -> torch.maximum with max_pos -> every op below is
            # a float32 tensor op with the Python scalars rounded to float32 (the exponent dim/(dim-2) included).
            s = dt.type(max(int(np.asarray(seq_len)), max_position_embeddings))
            x = (_s(factor, dt) * s) / _s(max_position_embeddings, dt) - _s(factor - 1, dt)
            x = _pow(x, np.asarray(_s(dim / (dim - 2), dt)), dt)
            new_base = _s(base, dt) * x
        return _rdiv(1.0, _pow(new_base, _exponents(dim, dim, dt), dt), dt), 1.0

    if rope_type == "yarn":
        factor = p["factor"]
        orig = p["original_max_position_embeddings"]
        if factor is None:
            factor = max_position_embeddings / orig
        attention_factor = p.get("attention_factor")
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")

        def get_mscale(scale, m=1):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
            else:
                attention_factor = get_mscale(factor)
        beta_fast = p.get("beta_fast") or 32   # `or`: HF treats 0 / None as "use the default"
        beta_slow = p.get("beta_slow") or 1

        def find_correction_dim(num_rotations):
            return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

        truncate = p.get("truncate", True)
        low, high = find_correction_dim(beta_fast), find_correction_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # HF: "Prevent singularity"

        pos_freqs = _pow(base, _exponents(dim, dim, dt), dt)
        inv_extrap = _rdiv(1.0, pos_freqs, dt)
        inv_interp = _rdiv(1.0, _s(factor, dt) * pos_freqs, dt)
        # linear ramp over dim // 2 in float32: (arange - low) / (high - low), the difference taken in Python.
        ramp = np.clip((np.arange(dim // 2, dtype=dt) - _s(low, dt)) / _s(high - low, dt), 0, 1).astype(dt)
        extrap_factor = one - ramp
        inv = inv_interp * (one - extrap_factor) + inv_extrap * extrap_factor
        return inv.astype(dt), float(attention_factor)

    if rope_type == "longrope":
        orig = p["original_max_position_embeddings"]
        factor = p.get("factor")
        if factor is None:
            factor = max_position_embeddings / orig
        attention_factor = p.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        # `if seq_len and seq_len > original`: long factors only strictly beyond the original length.
        use_long = seq_len is not None and int(np.asarray(seq_len)) > 0 and int(np.asarray(seq_len)) > orig
        ext = np.asarray(p["long_factor"] if use_long else p["short_factor"], dtype=dt)
        inv = _rdiv(1.0, ext * _pow(base, _exponents(dim, dim, dt), dt), dt)
        return inv, float(attention_factor)

    # llama3
    factor = p["factor"]
    lo, hi = p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p["original_max_position_embeddings"]
    inv = _rdiv(1.0, _pow(base, _exponents(dim, dim, dt), dt), dt)
    low_wl, high_wl = old_ctx / lo, old_ctx / hi      # Python floats, compared against float32 tensors below
    wavelen = _rdiv(2 * math.pi, inv, dt)
    inv_llama = np.where(wavelen > _s(low_wl, dt), inv / _s(factor, dt), inv)
    smooth = (_rdiv(old_ctx, wavelen, dt) - _s(lo, dt)) / _s(hi - lo, dt)
    smoothed = (one - smooth) * inv_llama / _s(factor, dt) + smooth * inv_llama
    is_medium = ~(wavelen < _s(high_wl, dt)) & ~(wavelen > _s(low_wl, dt))
    return np.where(is_medium, smoothed, inv_llama).astype(dt), 1.0


class RotaryEmbedding:
    """Stateful like HF's Gemma2RotaryEmbedding: dynamic NTK grows its frequencies when max(position_ids)+1 exceeds the
    cached length and resets when it falls below the original; longrope switches long/short factor on seq_len.

    ``dtype`` is the output (activation) dtype. float32: HF's arithmetic (angles, cos/sin in float32, times
    attention_scaling, cast to dtype). float64: everything in float64 (ground-truth mode). Other float dtypes
    (float16): computed in float32 then cast, as HF does with ``cos.to(x.dtype)``.
    """

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int, dtype=np.float32):
        validate_rope_parameters(rope_parameters, head_dim, max_position_embeddings)
        self.rope_parameters = dict(rope_parameters)
        self.rope_type = _rope_type(rope_parameters)
        self.head_dim = head_dim
        self.dtype = np.dtype(dtype)
        self.compute_dtype = np.dtype(np.float64 if self.dtype == np.float64 else np.float32)
        self.max_seq_len_cached = max_position_embeddings
        self.original_max_seq_len = max_position_embeddings
        self.max_position_embeddings = max_position_embeddings
        # Construction: the init function is called with seq_len=None (Python path).
        self.inv_freq, self.attention_scaling = compute_inv_freq(
            self.rope_parameters, head_dim, max_position_embeddings, None, self.compute_dtype)
        self.original_inv_freq = self.inv_freq.copy()
        self.long_inv_freq = None

    # -- dynamic_rope_update, transcribed --
    def _dynamic_update(self, seq_len: int) -> None:
        cached = self.max_seq_len_cached
        if seq_len > cached:  # growth: recompute with the tensor-path arithmetic (seq_len is a tensor in HF)
            self.inv_freq, self.attention_scaling = compute_inv_freq(
                self.rope_parameters, self.head_dim, self.max_position_embeddings, np.int64(seq_len),
                self.compute_dtype)
            self.max_seq_len_cached = seq_len
        # reset, judged on the cached length from *before* this call, as HF does
        if seq_len < self.original_max_seq_len and cached > self.original_max_seq_len:
            self.inv_freq = self.original_inv_freq
            self.max_seq_len_cached = self.original_max_seq_len

    def _longrope_update(self, seq_len: int) -> None:
        orig = self.rope_parameters["original_max_position_embeddings"]
        if self.long_inv_freq is None:
            # HF computes the long set with seq_len = original + 1 (a Python int); attention_scaling is NOT updated.
            self.long_inv_freq, _ = compute_inv_freq(
                self.rope_parameters, self.head_dim, self.max_position_embeddings, orig + 1, self.compute_dtype)
        self.inv_freq = self.long_inv_freq if seq_len > orig else self.original_inv_freq

    def __call__(self, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        position_ids = np.asarray(position_ids)
        if position_ids.ndim != 2 or not np.issubdtype(position_ids.dtype, np.integer):
            raise ValueError(f"position_ids must be a (batch, seq) integer array, got {position_ids.dtype} "
                             f"{position_ids.shape}")
        seq_len = int(position_ids.max()) + 1
        if "dynamic" in self.rope_type:      # HF's test is a substring test
            self._dynamic_update(seq_len)
        elif self.rope_type == "longrope":
            self._longrope_update(seq_len)
        return self.cos_sin(position_ids)

    def cos_sin(self, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin for the current frequencies, without the dynamic/longrope state update."""
        cdt = self.compute_dtype
        # position_ids.float() * inv_freq: one float32 rounding of the angle (positions < 2**24 are exact).
        freqs = position_ids[..., None].astype(cdt) * self.inv_freq.astype(cdt)
        if cdt == np.float32:
            # correctly rounded float32 cos/sin of the float32 angle (see module docstring)
            f64 = freqs.astype(np.float64)
            c, s = np.cos(f64).astype(np.float32), np.sin(f64).astype(np.float32)
        else:
            c, s = np.cos(freqs), np.sin(freqs)
        # emb = cat(freqs, freqs): cos/sin of the duplicated angles == duplicated cos/sin (computed once).
        scale = _s(self.attention_scaling, cdt)
        cos = np.concatenate([c, c], axis=-1) * scale
        sin = np.concatenate([s, s], axis=-1) * scale
        return cos.astype(self.dtype, copy=False), sin.astype(self.dtype, copy=False)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[x1, x2] -> [-x2, x1] on the last axis (halves, not interleaved pairs -- HF's layout)."""
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rotary_pos_emb(q: np.ndarray, k: np.ndarray, cos: np.ndarray, sin: np.ndarray):
    """q (B,H,T,D), k (B,Hk,T,D), cos/sin (B,T,D) -> (q*cos + rotate_half(q)*sin, same for k).

    Same op order as HF (two products then a sum, in the common dtype of q and cos; HF's cos/sin are already cast
    to the activation dtype). cos/sin get a head axis at position 1 (HF's unsqueeze_dim=1).
    """
    if cos.shape[-1] != q.shape[-1] or sin.shape != cos.shape:
        raise ValueError(f"cos/sin last dim {cos.shape[-1]} must equal head_dim {q.shape[-1]} (Gemma 2 rotates the "
                         "whole head), and sin must have cos's shape")
    cos = cos[:, None]
    sin = sin[:, None]
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
