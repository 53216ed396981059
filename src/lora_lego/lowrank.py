"""Exact low-rank algebra on LoRA factors: concatenation, units, inner products and the truncated SVD
of a sum of low-rank products, all without forming a dense (d_out, d_in) matrix."""

from __future__ import annotations

from typing import Sequence

import torch

from .types import LoraFactors


def scale_factors(factors: LoraFactors, weight: float, *, in_place: bool = False) -> LoraFactors:
    """Factors whose delta is `weight * B @ A`: sqrt(|weight|) on both sides, the sign on A (the same factors for 1).

    The one scale fold: methods weight adapters with it, readers fold a module's scale (alpha / r, ...) in
    with `in_place=True` (scaling the fresh tensors they read, not copies of them)."""
    if weight == 1:
        return factors
    root = abs(weight) ** 0.5
    sign = -1.0 if weight < 0 else 1.0
    if in_place:
        factors.A.mul_(sign * root)
        factors.B.mul_(root)
        return factors
    return LoraFactors(factors.A * (sign * root), factors.B * root, factors.kind)


def concat_factors(factors: Sequence[LoraFactors], weights: Sequence[float] | None = None) -> LoraFactors:
    """Stack ranks: A of shape (sum r_t, d_in), B of shape (d_out, sum r_t), delta = sum_t w_t B_t A_t exactly."""
    if weights is not None:
        factors = [scale_factors(f, w) for f, w in zip(factors, weights, strict=True)]
    return LoraFactors(
        torch.cat([f.A for f in factors], dim=0), torch.cat([f.B for f in factors], dim=1), factors[0].kind
    )


def to_units(factors: LoraFactors) -> torch.Tensor:
    """Rank-one units [a_i ; b_i], one per rank, of shape (r, d_in + d_out)."""
    return torch.cat([factors.A, factors.B.T], dim=1)


def from_units(units: torch.Tensor, d_in: int, kind: str = "linear") -> LoraFactors:
    """Inverse of `to_units`: units of shape (k, d_in + d_out) -> A (k, d_in), B (d_out, k)."""
    return LoraFactors(units[:, :d_in].contiguous(), units[:, d_in:].T.contiguous(), kind)


def factor_grams(factors: LoraFactors, *, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 Gram matrices (A A^T, B^T B), each of shape (r, r).

    `exact=False` multiplies in float32 (~3x faster; entries accurate to ~1e-7 of |a_i| |a_j|) and
    returns the products as float64.
    """
    if not exact and factors.A.dtype != torch.float64:
        A, B = factors.A.float(), factors.B.float()
        return gram(A).double(), gram(B.T).double()
    A, B = factors.A.double(), factors.B.double()
    return gram(A), gram(B.T)


def gram(rows: torch.Tensor) -> torch.Tensor:
    """rows @ rows.T for rows (u, d), computing only the upper block triangle and mirroring it.

    With u split into b row blocks, the products cost (b + 1) / 2b of the full one: measured 0.71x the
    time of rows @ rows.T at u = 128, d = 11008 (b = 4) and 0.62x at u = 1024 (b = 8), one thread.
    """
    u = rows.shape[0]
    blocks = min(u // 32, 8)
    if blocks < 2:
        return rows @ rows.T
    edges = [u * i // blocks for i in range(blocks + 1)]
    out = rows.new_empty(u, u)
    for start, stop in zip(edges, edges[1:]):
        band = rows[start:stop] @ rows[start:].T  # (stop - start, u - start): the diagonal block and those right of it
        out[start:stop, start:] = band
        out[stop:, start:stop] = band[:, stop - start:].T
    return out


def inner(left: LoraFactors, right: LoraFactors, gram: torch.Tensor | None = None) -> float:
    """Frobenius inner product <B1 A1, B2 A2> = sum((A1 A2^T) * (B1^T B2)), in float64.

    With an input Gram G = X^T X of shape (d_in, d_in): <X (B1 A1)^T, X (B2 A2)^T> = sum((A1 G A2^T) * (B1^T B2)),
    the inner product of the two deltas' outputs on the inputs X."""
    left_a = left.A.double() if gram is None else left.A.double() @ gram.double()
    cross_a = left_a @ right.A.double().T
    cross_b = left.B.double().T @ right.B.double()
    return float((cross_a * cross_b).sum())


def frobenius_norm(factors: LoraFactors) -> float:
    """||B @ A||_F from the (r, r) Gram matrices."""
    gram_a, gram_b = factor_grams(factors)
    return float((gram_a * gram_b).sum().clamp_min(0.0)) ** 0.5


def relative_error(approx: LoraFactors, target: LoraFactors) -> float:
    """||delta_approx - delta_target||_F / ||delta_target||_F, in low-rank form (0 if both are zero)."""
    difference = concat_factors([approx, target], [1.0, -1.0])
    target_norm = frobenius_norm(target)
    error = frobenius_norm(difference)
    if target_norm == 0.0:
        return 0.0 if error == 0.0 else float("inf")
    return error / target_norm


def relative_error_from_grams(approx: LoraFactors, target: LoraFactors, gram_a: torch.Tensor, gram_b: torch.Tensor,
                              coefficients: torch.Tensor | None = None) -> float:
    """`relative_error(approx, target)` reusing the target's Grams (A A^T, B^T B), each (u, u).

    ||R - T||^2 = ||R||^2 - 2 <R, T> + ||T||^2 costs O(k u d) beyond the Grams instead of O((k + u)^2 d).
    When approx's units combine target's, approx.A = C target.A and approx.B = target.B C^T with
    `coefficients` C (k, u), it needs no d-sized product at all: A_R A_T^T = C G_A, B_R^T B_T = C G_B.
    The difference cancels when R is close to T: below a relative error of 1e-2 the exact float64 path is used.
    """
    target_sq = float((gram_a * gram_b).sum().clamp_min(0.0))
    if target_sq == 0.0:
        return relative_error(approx, target)
    if coefficients is not None:
        c = coefficients.to(gram_a)
        cross_a, cross_b = c @ gram_a, c @ gram_b
        own_a, own_b = cross_a @ c.T, cross_b @ c.T
    else:
        A, B = approx.A.to(target.A.dtype), approx.B.to(target.B.dtype)
        cross_a, cross_b = (A @ target.A.T).double(), (B.T @ target.B).double()
        own_a, own_b = (A @ A.T).double(), (B.T @ B).double()
    error_sq = (float((own_a * own_b).sum()) - 2 * float((cross_a * cross_b).sum()) + target_sq) / target_sq
    if error_sq < 1e-4:
        return relative_error(approx, target)
    return error_sq ** 0.5


def truncated_svd(factors: LoraFactors, k: int) -> tuple[LoraFactors, torch.Tensor]:
    """Best rank-k approximation of delta = B @ A without the dense matrix.

    From the (r, r) Gram matrices, in float64. When B^T B = L L^T (Cholesky) is well conditioned,
    B = Q L^T with orthonormal Q = B L^-T, so delta = Q (L^T A) and the eigendecomposition
    L^T (A A^T) L = W S^2 W^T gives delta's singular values S, its right singular vectors
    S^-1 W^T L^T A and its left ones B L^-T W (`_top_svd_cholesky`, one eigh of size r: 2x faster than the
    general route at r = 1024). Otherwise (B's columns nearly dependent, e.g. an adapter merged with a copy
    of itself) the two Grams are each eigendecomposed and the small core between them takes an SVD
    (`_top_svd_eigh`). Either way only the top-k singular vectors are formed, straight from B and A
    (O(d r k), no d x r basis), directions with eigenvalue <= r eps max carry ~1e-8 of ||delta|| or less
    and are dropped, and the singular values are accurate to ~1e-8 of the largest unless the ranks
    cancel: when ||delta|| < 1e-3 ||B|| ||A|| (e.g. an adapter minus a near copy of itself) the
    backward-stable QR route (`_truncated_svd_qr`) is taken instead. With n = min(r, d_out, d_in),
    returns balanced factors (sqrt of each singular value on each side) of rank min(k, n), A (k, d_in),
    B (d_out, k) (zero ranks past delta's numerical rank), and all n singular values (descending). Signs
    are fixed so that the largest-magnitude entry of each left singular vector is positive, which makes
    the result unique when singular values are distinct.
    """
    dtype, n = factors.A.dtype, min(factors.rank, factors.d_in, factors.d_out)  # delta's rank is at most n
    k = min(k, n)
    A, B = factors.A.double(), factors.B.double()
    gram_a, gram_b = gram(A), gram(B.T)
    left, s, right = _top_svd_cholesky(A, B, gram_a, gram_b, k) or _top_svd_eigh(A, B, gram_a, gram_b, k)
    if float(s.pow(2).sum()) < 1e-6 * float(gram_a.trace()) * float(gram_b.trace()):
        return _truncated_svd_qr(factors, k)  # delta lies in the Grams' least accurate directions
    singular = torch.cat([s[:n], s.new_zeros(max(n - s.shape[0], 0))])
    m = left.shape[1]
    if m < k:  # delta has numerical rank m < k: the remaining ranks are zero
        left = torch.cat([left, left.new_zeros(left.shape[0], k - m)], dim=1)
        right = torch.cat([right, right.new_zeros(k - m, right.shape[1])])
    return balanced_factors(left, singular, right, k, factors.kind, dtype), singular.to(dtype)


def _top_svd_cholesky(A: torch.Tensor, B: torch.Tensor, gram_a: torch.Tensor, gram_b: torch.Tensor,
                      k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Left (d_out, m) and right (m, d_in) top singular vectors of B A (m <= k) and all r singular values,
    through the Cholesky factor of B^T B; None when that factor is singular or ill conditioned (a pivot
    below 1e-8 of the largest diagonal entry, in squared units)."""
    if gram_b.numel() == 0:
        return None
    factor, info = torch.linalg.cholesky_ex(gram_b)
    if int(info) != 0 or float(factor.diagonal().min()) ** 2 < 1e-8 * float(gram_b.diagonal().max()):
        return None
    inner = factor.T @ gram_a @ factor  # (r, r) = (L^T A)(L^T A)^T
    values, vectors = torch.linalg.eigh((inner + inner.T) / 2)
    values, vectors = values.flip(0), vectors.flip(1)  # descending
    s = values.clamp_min(0).sqrt()
    rank = int((values > max(float(values[0]), 0.0) * values.shape[0] * torch.finfo(values.dtype).eps).sum())
    w = vectors[:, :min(k, rank)]
    right = ((w / s[:w.shape[1]]).T @ factor.T) @ A
    left = B @ torch.linalg.solve_triangular(factor.T, w, upper=True)
    return left, s, right


def _top_svd_eigh(A: torch.Tensor, B: torch.Tensor, gram_a: torch.Tensor, gram_b: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_top_svd_cholesky`'s result for any B: with B^T B = V_b L_b V_b^T and A A^T = V_a L_a V_a^T,
    delta = Q_b C Q_a^T with orthonormal Q_b = B V_b L_b^(-1/2), Q_a^T = L_a^(-1/2) V_a^T A and the small
    core C = L_b^(1/2) V_b^T V_a L_a^(1/2), whose SVD C = U S W^T gives the singular values S."""
    root_b, basis_b = _gram_roots(gram_b)  # (m_b,), (r, m_b): B^T B restricted to its numerical range
    root_a, basis_a = _gram_roots(gram_a)
    core = root_b[:, None] * (basis_b.T @ basis_a) * root_a  # (m_b, m_a)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    m = min(k, s.shape[0])
    left = B @ ((basis_b / root_b) @ u[:, :m])  # (d_out, m) = Q_b U_m
    right = (vh[:m] @ (basis_a / root_a).T) @ A  # (m, d_in) = W_m^T Q_a^T
    return left, s, right


def _truncated_svd_qr(factors: LoraFactors, k: int) -> tuple[LoraFactors, torch.Tensor]:
    """`truncated_svd` through reduced QR factorisations B = Qb Rb and A^T = Qa Ra (delta = Qb (Rb Ra^T) Qa^T)."""
    q_b, r_b = torch.linalg.qr(factors.B.double())
    q_a, r_a = torch.linalg.qr(factors.A.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return balanced_factors(q_b @ u, s, vh @ q_a.T, k, factors.kind, factors.A.dtype), s.to(factors.A.dtype)


def _gram_roots(gram_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Square roots of the eigenvalues of a (r, r) Gram matrix above r eps max, and their eigenvectors (r, m)."""
    values, vectors = torch.linalg.eigh(gram_matrix)
    largest = float(values.max()) if values.numel() else 0.0
    keep = values > max(largest, 0.0) * gram_matrix.shape[0] * torch.finfo(values.dtype).eps
    keep &= values > 0
    return values[keep].sqrt(), vectors[:, keep]


def dense_truncated_svd(matrix: torch.Tensor, k: int, *, generator: torch.Generator | None = None,
                        exact: bool = False, oversample: int = 10, n_iter: int = 4,
                        kind: str = "linear") -> LoraFactors:
    """Rank-k balanced factors of a dense (d_out, d_in) matrix: B (d_out, k), A (k, d_in).

    `exact=True` runs a full SVD (float64 core, seconds per 4096 x 4096 matrix on a CPU); otherwise a
    randomized range finder (Halko et al. 2011) with `oversample` extra columns and `n_iter` power
    iterations draws its test matrix from `generator` (never the global RNG) and is near-optimal in
    Frobenius error. Either way the same sign rule as `truncated_svd` applies.
    """
    dtype = matrix.dtype
    d_out, d_in = matrix.shape
    k = min(k, d_out, d_in)
    if exact or k + oversample >= min(d_out, d_in):
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return balanced_factors(u, s, vh, k, kind, dtype)
    work = matrix.float()
    draw_on = generator.device if generator is not None else work.device
    probe = torch.randn(d_in, k + oversample, generator=generator, dtype=work.dtype, device=draw_on).to(work.device)
    basis = torch.linalg.qr(work @ probe).Q
    for _ in range(n_iter):  # power iterations, re-orthonormalised each half step
        basis = torch.linalg.qr(work @ torch.linalg.qr(work.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd((basis.T @ work).double(), full_matrices=False)
    return balanced_factors(basis.double() @ u, s, vh, k, kind, dtype)


def balanced_factors(left: torch.Tensor, s: torch.Tensor, right: torch.Tensor, k: int, kind: str,
                     dtype: torch.dtype) -> LoraFactors:
    """Factors of the top-k part of left @ diag(s) @ right: sqrt(s) on each side, sign-normalised.

    left (d_out, >= k) with orthonormal columns, s (>= k,) descending, right (>= k, d_in). The sign of
    each rank is chosen so that the largest-magnitude entry of its left singular vector is positive.
    """
    k = min(k, s.shape[0])
    left, right = left[:, :k], right[:k]
    pivot = left.abs().argmax(dim=0)
    signs = torch.sign(left[pivot, torch.arange(k, device=left.device)])
    signs[signs == 0] = 1.0
    root = s[:k].sqrt()
    return LoraFactors(((signs * root)[:, None] * right).to(dtype), (left * (signs * root)).to(dtype), kind)
