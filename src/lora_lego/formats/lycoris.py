"""LyCORIS algebra: LoHa, LoKr and Tucker (CP) layouts as exact plain low-rank factors (pure torch).

Every delta here is a matrix on the unfolded weight, (d_out, d_in) with d_in = c_in * kh * kw for a
convolution, so a result is an ordinary `LoraFactors`. Layout functions read shapes only (for lazy
reading) and raise ValueError with a message the caller puts after the file and module names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ..lowrank import dense_truncated_svd, truncated_svd
from ..types import LoraFactors

Shapes = Mapping[str, tuple[int, ...]]
Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """What a LoHa / LoKr module's shapes say: the unfolded delta shape (d_out, d_in), the kernel (kh, kw) when a
    tensor keeps it (None when LyCORIS flattened it into d_in, or for linear layers), the rank of the exact plain
    expansion, and `dim`, the rank LyCORIS divides alpha by (None: LoKr with both halves full, scale 1)."""

    shape: tuple[int, int]
    kernel: tuple[int, int] | None
    rank: int
    dim: int | None


def _need(shapes: Shapes, *names: str) -> None:
    missing = [name for name in names if name not in shapes]
    if missing:
        raise ValueError(f"has {', '.join(sorted(shapes))} but no {', '.join(missing)}")


def _ndim(shapes: Shapes, name: str, *allowed: int) -> tuple[int, ...]:
    shape = tuple(shapes[name])
    if len(shape) not in allowed:
        raise ValueError(f"{name} has shape {shape}; expected {' or '.join(f'{n}-D' for n in allowed)}")
    return shape


def _tucker_kernel(core: tuple[int, ...], name: str) -> tuple[int, int]:
    if len(core) != 4:
        raise ValueError(f"{name} has shape {core}; expected (r, r, kh, kw) (Tucker cores of 2-D convolutions only)")
    return core[2], core[3]


def _half_shape(shapes: Shapes, side: str) -> tuple[int, int, int, tuple[int, int] | None]:
    """One LoHa half hada_w{side}: (d_out, d_in unfolded, rank, kernel or None)."""
    a, b, t = f"hada_w{side}_a", f"hada_w{side}_b", f"hada_t{side}"
    _need(shapes, a, b)
    a_shape, b_shape = _ndim(shapes, a, 2), _ndim(shapes, b, 2)
    if t in shapes:  # Tucker: t (r, r', kh, kw), a (r, d_out), b (r', c_in)
        core = tuple(shapes[t])
        kernel = _tucker_kernel(core, t)
        if (core[0], core[1]) != (a_shape[0], b_shape[0]):
            raise ValueError(f"{t} {core}, {a} {a_shape} and {b} {b_shape} disagree; expected (r, r', kh, kw), "
                             "(r, d_out) and (r', c_in)")
        return a_shape[1], b_shape[1] * kernel[0] * kernel[1], core[0], kernel
    if a_shape[1] != b_shape[0]:
        raise ValueError(f"{a} has shape {a_shape} and {b} {b_shape}; expected (d_out, r) and (r, d_in)")
    return a_shape[0], b_shape[1], a_shape[1], None


def loha_layout(shapes: Shapes) -> Layout:
    """LoHa: delta = (W1 * W2) alpha / dim, W_s = hada_w{s}_a @ hada_w{s}_b (Tucker: the core t_s between them).

    Exact expansion rank r1 * r2; dim = hada_w1_b.shape[0] (LyCORIS' lora_dim, also with Tucker).
    """
    if ("hada_t1" in shapes) != ("hada_t2" in shapes):
        raise ValueError("has only one of hada_t1 / hada_t2; expected both (Tucker) or neither")
    out1, in1, r1, kernel1 = _half_shape(shapes, "1")
    out2, in2, r2, kernel2 = _half_shape(shapes, "2")
    if (out1, in1, kernel1) != (out2, in2, kernel2):
        raise ValueError(f"its two Hadamard halves have different shapes ({out1}, {in1}) and ({out2}, {in2})")
    return Layout((out1, in1), kernel1, r1 * r2, shapes["hada_w1_b"][0])


def _kron_half(shapes: Shapes, side: str) -> tuple[int, int, int, int | None, tuple[int, int] | None]:
    """One LoKr half lokr_w{side}: (rows, unfolded columns, exact rank, factored rank or None, kernel or None)."""
    full, a, b, t = f"lokr_w{side}", f"lokr_w{side}_a", f"lokr_w{side}_b", f"lokr_t{side}"
    if full in shapes:
        if a in shapes or b in shapes:
            raise ValueError(f"has {full} and {a} / {b}; expected one of the two forms")
        shape = _ndim(shapes, full, 2, 4) if side == "2" else _ndim(shapes, full, 2)
        kernel = (shape[2], shape[3]) if len(shape) == 4 else None
        columns = math.prod(shape[1:])
        return shape[0], columns, min(shape[0], columns), None, kernel
    _need(shapes, a, b)
    a_shape, b_shape = _ndim(shapes, a, 2), _ndim(shapes, b, 2, 4)
    if t in shapes:  # Tucker: t (r, r', kh, kw), a (r, rows), b (r', c)
        core = tuple(shapes[t])
        kernel = _tucker_kernel(core, t)
        if len(b_shape) != 2 or (core[0], core[1]) != (a_shape[0], b_shape[0]):
            raise ValueError(f"{t} {core}, {a} {a_shape} and {b} {b_shape} disagree; expected (r, r', kh, kw), "
                             "(r, rows) and (r', columns)")
        return a_shape[1], b_shape[1] * kernel[0] * kernel[1], core[0], b_shape[0], kernel
    if a_shape[1] != b_shape[0]:
        raise ValueError(f"{a} has shape {a_shape} and {b} {b_shape}; expected (rows, r) and (r, columns)")
    kernel = (b_shape[2], b_shape[3]) if len(b_shape) == 4 else None
    return a_shape[0], math.prod(b_shape[1:]), a_shape[1], b_shape[0], kernel


def lokr_layout(shapes: Shapes) -> Layout:
    """LoKr: delta = kron(W1, W2) alpha / dim, each half full (lokr_w{s}) or factored (lokr_w{s}_a @ _b; W2 also
    Tucker with lokr_t2). dim = the rank of the factored half (w1 first, as LyCORIS' modules; read from the _b
    factor, which holds it in every layout); both halves full: scale 1. Exact rank rank(W1) * rank(W2),
    with min(rows, columns) for a full half.
    """
    if "lokr_t1" in shapes:
        raise ValueError("has lokr_t1 (a Tucker core on the first Kronecker half), a layout no LyCORIS version "
                         "writes; expected lokr_w1 or lokr_w1_a / lokr_w1_b")
    if "lokr_t2" in shapes and "lokr_w2" in shapes:
        raise ValueError("has lokr_t2 with a full lokr_w2; expected lokr_t2 with lokr_w2_a / lokr_w2_b")
    rows1, cols1, rank1, dim1, _ = _kron_half(shapes, "1")
    rows2, cols2, rank2, dim2, kernel = _kron_half(shapes, "2")
    return Layout((rows1 * rows2, cols1 * cols2), kernel, rank1 * rank2, dim1 if dim1 is not None else dim2)


def fold_tucker(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The Tucker chain core o down as one factor: core (r, r', kh, kw), down (r', c) -> (r, c * kh * kw),
    row i = sum_j core[i, j] (x) down[j], flattened as a conv weight (c, kh, kw)."""
    return torch.einsum("ijhw,jc->ichw", core, down).reshape(core.shape[0], -1)


def _full_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of a full matrix (m, n) of rank min(m, n): (identity, weight) or (weight, identity)."""
    m, n = weight.shape
    eye = torch.eye(min(m, n), dtype=weight.dtype)
    return (eye, weight) if m <= n else (weight, eye)


def _hadamard_half(tensors: Tensors, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_s (d_out, r), A_s (r, d_in)) of W_s."""
    a, b = tensors[f"hada_w{side}_a"], tensors[f"hada_w{side}_b"]
    core = tensors.get(f"hada_t{side}")
    if core is None:
        return a, b.reshape(b.shape[0], -1)
    return a.T, fold_tucker(core, b)


def loha_factors(tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact plain factors of (W1 * W2) (no scale): A (r1 r2, d_in), B (d_out, r1 r2).

    A Hadamard product of two low-rank products is low rank: (B1 A1) * (B2 A2) = B A with
    B[:, (i, j)] = B1[:, i] * B2[:, j] and A[(i, j)] = A1[i] * A2[j].
    """
    b1, a1 = _hadamard_half(tensors, "1")
    b2, a2 = _hadamard_half(tensors, "2")
    B = (b1[:, :, None] * b2[:, None, :]).reshape(b1.shape[0], -1)
    A = (a1[:, None, :] * a2[None, :, :]).reshape(-1, a1.shape[1])
    return A, B


def _kron_factors(tensors: Tensors, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_s (rows, r), A_s (r, columns)) of the unfolded LoKr half W_s."""
    full = tensors.get(f"lokr_w{side}")
    if full is not None:
        return _full_factors(full.reshape(full.shape[0], -1))
    a, b = tensors[f"lokr_w{side}_a"], tensors[f"lokr_w{side}_b"]
    core = tensors.get(f"lokr_t{side}")
    if core is not None:  # a (r, rows), b (r', c)
        return a.T, fold_tucker(core, b)
    return a, b.reshape(b.shape[0], -1)


def lokr_factors(tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact plain factors of kron(W1, W2) (no scale) on the unfolded weight: A (r1 r2, c1 c2), B (a1 a2, r1 r2).

    kron(B1 A1, B2 A2) = kron(B1, B2) kron(A1, A2) (mixed-product rule). For a convolution W2 is unfolded to
    (b, d kh kw), and kron(W1, W2 unfolded) is exactly LyCORIS' 4-D kron(W1[..., None, None], W2) unfolded.
    """
    b1, a1 = _kron_factors(tensors, "1")
    b2, a2 = _kron_factors(tensors, "2")
    return kron(a1, a2), kron(b1, b2)


def kron(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Kronecker product of x (m, n) and y (p, q), of shape (m p, n q) (torch.kron fails on some transposed
    operands with a unit dimension)."""
    return (x[:, None, :, None] * y[None, :, None, :]).reshape(x.shape[0] * y.shape[0], x.shape[1] * y.shape[1])


def plain_rank(exact_rank: int, shape: tuple[int, int], rank: int | None) -> int:
    """The rank `to_plain` returns for an expansion of `exact_rank` on a (d_out, d_in) delta."""
    full = min(exact_rank, *shape)
    return full if rank is None else min(rank, full)


def to_plain(A: torch.Tensor, B: torch.Tensor, kind: str, rank: int | None) -> LoraFactors:
    """Factors of B @ A: exact (`rank` None), or its best rank-`rank` approximation (truncated SVD).

    An expansion of rank above min(d_out, d_in) (possible for LoHa's r^2) goes through the dense delta's SVD,
    which is exact at rank min(d_out, d_in); otherwise the low-rank SVD of `lowrank.truncated_svd` avoids it.
    Returns rank `plain_rank(A.shape[0], (d_out, d_in), rank)`.
    """
    factors = LoraFactors(A.contiguous(), B.contiguous(), kind)
    full = min(factors.rank, factors.d_out, factors.d_in)
    if factors.rank > full:
        return dense_truncated_svd(factors.delta(), full if rank is None else min(rank, full), exact=True, kind=kind)
    if rank is None:
        return factors
    return truncated_svd(factors, rank)[0]
