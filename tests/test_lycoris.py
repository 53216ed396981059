"""LyCORIS algebra (formats/lycoris.py) against LyCORIS' own functional code: LoHa, LoKr and Tucker layouts expand
to exact plain factors of the stated rank, layouts read from shapes alone, and `to_plain` truncates optimally."""

import math

import pytest
import torch

from lora_lego.formats import lycoris

pytest.importorskip("lycoris.functional", reason="needs the test extra (lycoris-lora)")
from lycoris.functional import locon as ly_locon
from lycoris.functional import loha as ly_loha
from lycoris.functional import lokr as ly_lokr


def draw(generator, *shape):
    return torch.randn(*shape, generator=generator)


def rel(actual, expected):
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


LOHA_CASES = {  # name -> (tensors' shapes, kernel)
    "linear": ({"hada_w1_a": (6, 3), "hada_w1_b": (3, 10), "hada_w2_a": (6, 2), "hada_w2_b": (2, 10)}, None),
    "conv flattened": ({"hada_w1_a": (4, 2), "hada_w1_b": (2, 5 * 9), "hada_w2_a": (4, 2), "hada_w2_b": (2, 5 * 9)},
                       None),
    "conv tucker": ({"hada_t1": (2, 2, 3, 3), "hada_w1_a": (2, 4), "hada_w1_b": (2, 5),
                     "hada_t2": (2, 2, 3, 3), "hada_w2_a": (2, 4), "hada_w2_b": (2, 5)}, (3, 3)),
}


@pytest.mark.parametrize("case", list(LOHA_CASES))
def test_loha_expands_exactly_to_rank_r1_r2(case):
    shapes, kernel = LOHA_CASES[case]
    g = torch.Generator().manual_seed(1)
    t = {name: draw(g, *shape) for name, shape in shapes.items()}
    layout = lycoris.loha_layout(shapes)
    A, B = lycoris.loha_factors(t)
    # LyCORIS' order: (w1d, w1u, w2d, w2u, t1, t2) = (hada_w1_b, hada_w1_a, hada_w2_b, hada_w2_a, ...)
    reference = ly_loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t.get("hada_t1"),
                                    t.get("hada_t2"), gamma=1.0, backend="torch")
    r1, r2 = shapes["hada_w1_b"][0], shapes["hada_w2_b"][0]
    assert A.shape[0] == B.shape[1] == layout.rank == r1 * r2
    assert layout.shape == (B.shape[0], A.shape[1]) and layout.kernel == kernel and layout.dim == r1
    assert rel(B @ A, reference.reshape(reference.shape[0], -1)) < 1e-6


LOKR_CASES = {  # name -> (shapes, kernel, rank of the exact expansion, the rank alpha divides by)
    "full x factored": ({"lokr_w1": (2, 3), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 5)}, None, 2 * 2, 2),
    "factored x factored": ({"lokr_w1_a": (3, 1), "lokr_w1_b": (1, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 5)},
                            None, 1, 1),
    "full x full": ({"lokr_w1": (2, 3), "lokr_w2": (4, 3)}, None, 2 * 3, None),
    "tall full x full": ({"lokr_w1": (3, 2), "lokr_w2": (4, 3)}, None, 2 * 3, None),
    "conv full x full 4-D": ({"lokr_w1": (2, 2), "lokr_w2": (3, 2, 3, 3)}, (3, 3), 2 * 3, None),
    "conv flattened w2_b": ({"lokr_w1": (2, 2), "lokr_w2_a": (3, 2), "lokr_w2_b": (2, 4 * 9)}, None, 2 * 2, 2),
    "conv 4-D w2_b": ({"lokr_w1": (2, 2), "lokr_w2_a": (3, 2), "lokr_w2_b": (2, 4, 3, 3)}, (3, 3), 2 * 2, 2),
    "conv tucker": ({"lokr_w1_a": (2, 1), "lokr_w1_b": (1, 3), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 4),
                     "lokr_w2_b": (2, 5)}, (3, 3), 1 * 2, 1),
}


@pytest.mark.parametrize("case", list(LOKR_CASES))
def test_lokr_expands_exactly_to_rank_w1_times_rank_w2(case):
    shapes, kernel, rank, dim = LOKR_CASES[case]
    g = torch.Generator().manual_seed(2)
    t = {name: draw(g, *shape) for name, shape in shapes.items()}
    layout = lycoris.lokr_layout(shapes)
    A, B = lycoris.lokr_factors(t)
    keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")  # LyCORIS' order
    halves = [t.get(key) for key in keys]
    reference = ly_lokr.kron_weight(*halves, scale=1.0, backend="torch")
    assert A.shape[0] == B.shape[1] == layout.rank == rank
    assert layout.shape == (B.shape[0], A.shape[1]) == (reference.shape[0], math.prod(reference.shape[1:]))
    assert layout.kernel == kernel and layout.dim == dim
    assert rel(B @ A, reference.reshape(reference.shape[0], -1)) < 1e-6


def test_lokr_tucker_scale_dim_is_the_rank_not_w2_a_columns():
    # w2_a of a Tucker LoKr is (r, b): LyCORIS' functional rank_scale (and its reload) read its columns (b),
    # while the trained module divides alpha by r = lokr_w2_b.shape[0], which the layout reports
    shapes = LOKR_CASES["conv tucker"][0] | {"lokr_w1": (2, 3)}
    del shapes["lokr_w1_a"], shapes["lokr_w1_b"]
    assert lycoris.lokr_layout(shapes).dim == 2 != shapes["lokr_w2_a"][1]


def test_fold_tucker_equals_locon_tucker_rebuild():
    g = torch.Generator().manual_seed(3)
    down, mid, up = draw(g, 3, 5, 1, 1), draw(g, 2, 3, 3, 3), draw(g, 4, 2, 1, 1)
    reference = ly_locon.diff_weight(down, up, mid, gamma=1.0, backend="torch")  # (4, 5, 3, 3)
    A = lycoris.fold_tucker(mid, down.flatten(1))
    assert A.shape == (2, 5 * 9)
    assert rel(up.flatten(1) @ A, reference.flatten(1)) < 1e-6


def test_kron_equals_torch_kron_also_on_transposed_unit_columns():
    g = torch.Generator().manual_seed(4)
    x, y = draw(g, 2, 3), draw(g, 1, 4).T  # (4, 1) with strides (1, 4): torch.kron raises on it
    assert torch.allclose(lycoris.kron(x, y), torch.kron(x, torch.tensor(y.tolist())), atol=0, rtol=0)


def test_to_plain_exact_keeps_the_factors():
    g = torch.Generator().manual_seed(5)
    A, B = draw(g, 3, 10), draw(g, 6, 3)
    factors = lycoris.to_plain(A, B, "linear", None)
    assert torch.equal(factors.A, A) and torch.equal(factors.B, B)
    assert lycoris.plain_rank(3, (6, 10), None) == 3


def test_to_plain_above_full_rank_is_exact_at_min_dims():
    g = torch.Generator().manual_seed(6)
    A, B = draw(g, 9, 4 * 9), draw(g, 4, 9)  # a LoHa of r = 3 on a 4-channel 3x3 conv: r^2 = 9 > 4
    factors = lycoris.to_plain(A, B, "conv3x3", None)
    assert factors.rank == 4 == lycoris.plain_rank(9, (4, 36), None) and factors.kind == "conv3x3"
    assert rel(factors.delta(), B @ A) < 1e-6


@pytest.mark.parametrize("shape, rank", [((12, 20), 4), ((5, 20), 9)])  # low-rank route, dense route (r > d_out)
def test_to_plain_truncation_is_the_best_rank_k(shape, rank):
    g = torch.Generator().manual_seed(7)
    A, B = draw(g, rank, shape[1]), draw(g, shape[0], rank)
    delta = B @ A
    s = torch.linalg.svdvals(delta.double())
    for k in (1, 2, 3):
        factors = lycoris.to_plain(A, B, "linear", k)
        assert factors.rank == k == lycoris.plain_rank(rank, shape, k)
        optimum = float(s[k:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        assert rel(factors.delta(), delta) == pytest.approx(optimum, rel=1e-4)


@pytest.mark.parametrize("layout, shapes, message", [
    (lycoris.loha_layout, {"hada_w1_a": (4, 2), "hada_w1_b": (2, 5), "hada_w2_a": (4, 2), "hada_w2_b": (2, 6)},
     "different shapes"),
    (lycoris.loha_layout, {"hada_w1_a": (4, 2), "hada_w1_b": (3, 5), "hada_w2_a": (4, 2), "hada_w2_b": (2, 5)},
     "expected (d_out, r) and (r, d_in)"),
    (lycoris.loha_layout, {"hada_t1": (2, 2, 3, 3), "hada_w1_a": (2, 4), "hada_w1_b": (2, 5), "hada_w2_a": (2, 4),
                           "hada_w2_b": (2, 5)}, "only one of hada_t1 / hada_t2"),
    (lycoris.loha_layout, {"hada_w1_a": (4, 2), "hada_w1_b": (2, 5), "hada_w2_a": (4, 2)}, "no hada_w2_b"),
    (lycoris.lokr_layout, {"lokr_w1": (2, 2), "lokr_w1_a": (2, 1), "lokr_w2": (2, 2)}, "one of the two forms"),
    (lycoris.lokr_layout, {"lokr_w1": (2, 2), "lokr_t1": (1, 1, 3, 3), "lokr_w2": (2, 2)}, "lokr_t1"),
    (lycoris.lokr_layout, {"lokr_w1": (2, 2), "lokr_t2": (1, 1, 3, 3), "lokr_w2": (2, 2)}, "full lokr_w2"),
    (lycoris.lokr_layout, {"lokr_w1": (2, 2, 1), "lokr_w2": (2, 2)}, "expected 2-D"),
])
def test_layouts_refuse_inconsistent_shapes(layout, shapes, message):
    with pytest.raises(ValueError) as caught:
        layout(shapes)
    assert message in str(caught.value)
