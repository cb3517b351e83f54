"""Feature maps of kernelized attention, their backward passes, and the random-feature samplers.

Kernelized attention replaces exp(q·k·scale) by a dot product of features φ(q)·φ(k)
(:mod:`tinyeff.attention.linear`, :mod:`tinyeff.attention.performer`).  Four maps, each
row-wise (row = one token), each a forward/backward pair:

    elu     φ(x) = elu(x) + 1          = x + 1 (x > 0),  eˣ (x ≤ 0)          (Katharopoulos 2020)
    relu    φ(x) = relu(x) + 1                                             (tinyeff design doc)
    favor_softmax  φ(x)_f = m^(−1/2) · exp(ω_f·x̂ − ‖x̂‖²/2),   x̂ = √scale · x  (FAVOR+)
    favor_relu     φ(x)_f = relu(ω_f·x̂) + kernel_eps                     (generalized attention)

ω is the (m, D) matrix of random features (rows ω_f), an explicit argument drawn by
:func:`gaussian_features` or :func:`orthogonal_features` from a ``numpy.random.Generator``.
With scale = 1/√D, x̂ = D^(−1/4) x and E_ω[φ(q)·φ(k)] = exp(q·k/√D) (Choromanski et al. 2021,
"Rethinking Attention with Performers", Lemma 1).

Log-scaled features
-------------------
``favor_softmax`` returns its features in *stabilized* form, a pair (f, ℓ) with

    a_f = ω_f·x̂ − ‖x̂‖²/2,     c = max_f a_f,     f = exp(a − c) ∈ (0, 1],     ℓ = c − ½ ln m,

so that φ(x) = f · exp(ℓ) exactly.  f never overflows (its largest entry is 1) whatever the
norm of x, and the log-scale ℓ carries the magnitude; the attention core combines the ℓ's so
that they cancel exactly (see :mod:`tinyeff.attention.linear`).  The other maps return
ℓ = None (meaning 0).  In every backward the shift c is a constant: φ = f·exp(ℓ) holds for any
c, so d(f·exp(ℓ))/dx with c held fixed is the true derivative.

Shapes: x (..., L, D) → f (..., L, F) with F = D for elu/relu and F = m for FAVOR maps;
ℓ (..., L).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..ctx import Ctx

KINDS = ("elu", "relu", "favor_softmax", "favor_relu")


# --------------------------------------------------------------------------- elu + 1, relu + 1

def elu_plus_one(x: np.ndarray) -> np.ndarray:
    """φ(x) = elu(x) + 1: x + 1 for x > 0, exp(x) for x ≤ 0 (strictly positive)."""
    f = np.exp(np.minimum(x, 0))                                   # (..., L, D) e^min(x,0)
    f += np.maximum(x, 0)                                          # = x + 1 (x > 0), eˣ (x ≤ 0)
    return f


def elu_plus_one_backward(df: np.ndarray, f: np.ndarray) -> np.ndarray:
    """dx from the saved φ: φ'(x) = 1 for x > 0 and eˣ = φ(x) for x ≤ 0, i.e. min(φ, 1)."""
    # fwd: f = where(x > 0, x + 1, exp(x))
    return df * np.minimum(f, 1)                                   # (..., L, D)


def relu_plus_one(x: np.ndarray) -> np.ndarray:
    """φ(x) = relu(x) + 1 (≥ 1)."""
    return np.maximum(x, 0) + 1                                    # (..., L, D)


def relu_plus_one_backward(df: np.ndarray, x: np.ndarray) -> np.ndarray:
    """dx = df · [x > 0] (the subgradient 0 is taken at x = 0)."""
    # fwd: f = max(x, 0) + 1
    return df * (x > 0)                                            # (..., L, D)


# --------------------------------------------------------------------------- FAVOR+ features

def favor_softmax(x: np.ndarray, omega: np.ndarray, scale: float):
    """Positive random features of the softmax kernel, stabilized (module docstring).

    Returns ``f (..., L, m)`` in (0, 1] and the log-scale ``ell (..., L)``, φ(x) = f·exp(ℓ).
    """
    m = omega.shape[0]
    xh = x * math.sqrt(scale)                                      # (..., L, D)
    a = xh @ omega.T                                               # (..., L, m)
    a -= 0.5 * np.sum(xh * xh, axis=-1, keepdims=True)             # a = ω x̂ − ‖x̂‖²/2
    c = a.max(axis=-1, keepdims=True) if m else np.zeros(a.shape[:-1] + (1,), a.dtype)
    a -= c                                                         # a − c ≤ 0
    f = np.exp(a, out=a)                                           # (..., L, m)
    return f, c[..., 0] - 0.5 * math.log(max(m, 1))               # (..., L, m), (..., L)


def favor_softmax_backward(df: np.ndarray, f: np.ndarray, x: np.ndarray, omega: np.ndarray,
                           scale: float) -> np.ndarray:
    """dx of :func:`favor_softmax` with the shift c (hence ℓ) held constant."""
    root = math.sqrt(scale)
    xh = x * root                                                  # (..., L, D)
    # fwd: f = exp(a − c)                      (c constant)
    da = df * f                                                    # (..., L, m)
    # fwd: a = x̂ ωᵀ − ‖x̂‖²/2
    dxh = da @ omega                                               # (..., L, D)
    dxh -= np.sum(da, axis=-1, keepdims=True) * xh
    # fwd: x̂ = √scale · x
    dxh *= root
    return dxh


def favor_relu(x: np.ndarray, omega: np.ndarray, scale: float, kernel_eps: float) -> np.ndarray:
    """Generalized-attention features φ(x) = relu(ω x̂) + kernel_eps, x̂ = √scale · x."""
    u = (x * math.sqrt(scale)) @ omega.T                           # (..., L, m)
    np.maximum(u, 0, out=u)
    u += kernel_eps
    return u


def favor_relu_backward(df: np.ndarray, f: np.ndarray, x: np.ndarray, omega: np.ndarray,
                        scale: float, kernel_eps: float) -> np.ndarray:
    """dx of :func:`favor_relu` (subgradient 0 at ω x̂ = 0), from the saved features."""
    root = math.sqrt(scale)
    u = (x * root) @ omega.T                                       # (..., L, m) recomputed
    # fwd: f = relu(u) + kernel_eps   (u, not f, decides the sign: f may round to kernel_eps)
    du = df * (u > 0)                                              # (..., L, m)
    # fwd: u = x̂ ωᵀ ;  x̂ = √scale · x
    dx = du @ omega                                                # (..., L, D)
    dx *= root
    return dx


# --------------------------------------------------------------------------- one object per map

@dataclasses.dataclass(frozen=True)
class FeatureMap(Ctx):
    """A feature map with its parameters; nested in the attention context.

    ``forward(x) -> (f, ell)`` with ``ell`` None for the maps without log-scale, and
    ``backward(df, f, x) -> dx``.
    """

    kind: str                     # one of KINDS
    omega: np.ndarray | None      # (m, D) random features of the FAVOR maps, else None
    scale: float                  # x̂ = √scale · x (FAVOR maps)
    kernel_eps: float             # added to favor_relu features

    @property
    def n_features(self) -> int | None:
        return None if self.omega is None else self.omega.shape[0]

    def forward(self, x: np.ndarray):
        if self.kind == "elu":
            return elu_plus_one(x), None
        if self.kind == "relu":
            return relu_plus_one(x), None
        if self.kind == "favor_softmax":
            return favor_softmax(x, self.omega, self.scale)
        return favor_relu(x, self.omega, self.scale, self.kernel_eps), None

    def backward(self, df: np.ndarray, f: np.ndarray, x: np.ndarray) -> np.ndarray:
        if self.kind == "elu":
            return elu_plus_one_backward(df, f)
        if self.kind == "relu":
            return relu_plus_one_backward(df, x)
        if self.kind == "favor_softmax":
            return favor_softmax_backward(df, f, x, self.omega, self.scale)
        return favor_relu_backward(df, f, x, self.omega, self.scale, self.kernel_eps)


# --------------------------------------------------------------------------- samplers

def default_num_features(d: int) -> int:
    """m = ⌊D · ln D⌋ (performer-pytorch's default; 266 for D = 64), at least 1."""
    return max(1, int(d * math.log(d))) if d > 1 else 1


def gaussian_features(rng: np.random.Generator, m: int, d: int, dtype=np.float64) -> np.ndarray:
    """ω with i.i.d. N(0, 1) entries, shape (m, d) (drawn in float64, then cast)."""
    _generator(rng)
    return rng.standard_normal((m, d)).astype(dtype)               # (m, D)


def orthogonal_features(rng: np.random.Generator, m: int, d: int, dtype=np.float64,
                        scaling: str = "chi") -> np.ndarray:
    """Block-orthogonal ω (Choromanski et al. 2021, §2.4), shape (m, d).

    The m rows are cut into ⌈m/d⌉ blocks of d rows (the last one truncated to m mod d
    rows); each block holds the rows of an independent Haar-random orthogonal d×d matrix
    (QR of a standard-normal matrix, with the signs of R's diagonal moved into Q so the
    distribution is exactly Haar).  Rows are then rescaled:

    * ``scaling="chi"``: by the norm of a fresh N(0, I_d) vector (chi_d-distributed), so
      each row is marginally N(0, I_d) — the unbiased estimator (google-research and
      performer-pytorch ``scaling=0``);
    * ``scaling="sqrt_d"``: every row has norm √d (their ``scaling=1``).

    Draw order (for reproduction elsewhere): the ⌈m/d⌉ d×d Gaussian matrices first, then
    (for "chi") one (m, d) Gaussian matrix whose row norms are the scales.
    """
    _generator(rng)
    if scaling not in ("chi", "sqrt_d"):
        raise ValueError(f"scaling must be one of ['chi', 'sqrt_d'], got {scaling!r}")
    blocks = []
    for _ in range(-(-m // d) if d else 0):
        g = rng.standard_normal((d, d))                            # (D, D)
        qm, r = np.linalg.qr(g)
        qm = qm * np.where(np.diag(r) < 0, -1.0, 1.0)              # Haar: sign-fix the columns
        blocks.append(qm.T)                                        # rows orthonormal
    rows = np.concatenate(blocks, axis=0)[:m] if blocks else np.zeros((m, d))  # (m, D)
    if scaling == "chi":
        norms = np.linalg.norm(rng.standard_normal((m, d)), axis=1)  # (m,) chi_d
    else:
        norms = np.full(m, math.sqrt(d))                           # (m,)
    return (rows * norms[:, None]).astype(dtype)                   # (m, D)


def _generator(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
