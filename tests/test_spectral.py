"""The spectral merges (TSV-M, Iso-C, Iso-CTS, STAR, CtM), Pico and scale="norm": each against a dense
reference written here from the paper's definition, plus the invariants the papers state."""

from __future__ import annotations

import pytest
import torch

import lora_lego as ll
from lora_lego.cli import main
from lora_lego.core_space import core_space, pico_calibrate
from lora_lego.errors import MethodError
from lora_lego.methods import get_method
from lora_lego.types import LoraFactors
from synthetic import random_adapter

SHAPES = ((30, 20, 3), (30, 20, 5), (30, 20, 2))  # (d_out, d_in, rank): R = 10 < d


def random_factors(seed: int, shapes=SHAPES) -> list[LoraFactors]:
    generator = torch.Generator().manual_seed(seed)
    return [LoraFactors(torch.randn(r, d_in, generator=generator, dtype=torch.float64),
                        torch.randn(d_out, r, generator=generator, dtype=torch.float64)) for d_out, d_in, r in shapes]


def run(method: str, factors, weights, **params) -> torch.Tensor:
    result = get_method(method).fn(factors, weights, generator=torch.Generator().manual_seed(0), **params)
    return (result[0] if isinstance(result, tuple) else result).delta()


def svd(matrix: torch.Tensor, k: int | None = None):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = int((s > 1e-9 * s[0]).sum()) if k is None else k
    return u[:, :k], s[:k], vh[:k].T


def polar(matrix: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-7) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * float(expected.abs().max()))


# --- dense references: the papers' formulas on the d_out x d_in deltas ---------------------------------------

def dense_tsv(deltas, ranks):
    parts = [svd(d, r) for d, r in zip(deltas, ranks)]
    U = polar(torch.cat([u for u, _, _ in parts], 1))
    V = polar(torch.cat([v for _, _, v in parts], 1))
    return U @ torch.diag(torch.cat([s for _, s, _ in parts])) @ V.T


def dense_iso_c(deltas):
    u, s, v = svd(sum(deltas))
    return s.mean() * u @ v.T


def dense_iso_cts(deltas, D, common=0.8):
    total = sum(deltas)
    k = int(common * D)
    uc, sc, vc = svd(total, k)
    per_task = (D - k) // len(deltas)
    parts = [svd(d - uc @ uc.T @ d, per_task) for d in deltas]
    U = polar(torch.cat([uc, *[u for u, _, _ in parts]], 1))
    V = polar(torch.cat([vc, *[v for _, _, v in parts]], 1))
    return torch.cat([sc, *[s for _, s, _ in parts]]).mean() * U @ V.T


def dense_star(deltas, eta=0.4):
    out = 0
    for d in deltas:
        u, s, v = svd(d)
        k = next(i + 1 for i in range(len(s)) if s[: i + 1].sum() >= eta * s.sum())
        out = out + u[:, :k] @ torch.diag(s[:k] * s.sum() / s[:k].sum()) @ v[:, :k].T
    return out / len(deltas)


def reference_ties(tensors, density):
    kept = []
    for t in tensors:
        threshold = t.abs().flatten().topk(int(density * t.numel())).values[-1]
        kept.append(torch.where(t.abs() >= threshold, t, 0.0))
    stack = torch.stack(kept)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
    agree = (stack * sign) > 0
    return (stack * agree).sum(0) / agree.sum(0).clamp_min(1)


def dense_ctm(deltas, k, beta=0.25, density=0.5, iterations=10):
    norms = torch.stack([d.norm() for d in deltas])
    wanted = beta * norms + (1 - beta) * norms.mean()
    X = [d * w / n for d, w, n in zip(deltas, wanted, norms)]
    U = svd(torch.cat(X, 1), k)[0]  # HOSVD: mode-1 and mode-2 unfoldings
    V = svd(torch.cat([x.T for x in X], 1), k)[0]
    for _ in range(iterations):  # HOOI
        U = svd(torch.cat([x @ V for x in X], 1), k)[0]
        V = svd(torch.cat([x.T @ U for x in X], 1), k)[0]
    return U @ reference_ties([U.T @ d @ V for d in deltas], density) @ V.T


# --- the methods against the references ----------------------------------------------------------------------

def test_tsv_iso_star_equal_their_dense_definitions():
    factors = random_factors(0)
    deltas = [f.delta() for f in factors]
    close(run("tsv", factors, [1.0] * 3), dense_tsv(deltas, [3, 5, 2]))
    close(run("iso_c", factors, [1.0] * 3), dense_iso_c(deltas))
    close(run("iso_cts", factors, [1.0] * 3), dense_iso_cts(deltas, D=10))
    close(run("iso_cts", factors, [1.0] * 3, common=0.5), dense_iso_cts(deltas, D=10, common=0.5))
    close(run("star", factors, [1.0] * 3), dense_star(deltas))
    close(run("star", factors, [1.0] * 3, eta=0.9), dense_star(deltas, eta=0.9))


def test_weights_scale_each_task_before_the_rule():
    factors, weights = random_factors(1), [1.0, -0.5, 2.0]
    deltas = [w * f.delta() for f, w in zip(factors, weights)]
    close(run("tsv", factors, weights), dense_tsv(deltas, [3, 5, 2]))
    close(run("iso_c", factors, weights, scale=0.5), 0.5 * dense_iso_c(deltas))


def test_ctm_equals_its_dense_definition_and_has_rank_k():
    factors = random_factors(2)
    result = run("ctm", factors, [1.0] * 3, rank=4)
    close(result, dense_ctm([f.delta() for f in factors], 4), tol=1e-6)
    assert torch.linalg.matrix_rank(result) == 4


def test_iso_c_flattens_the_spectrum_and_keeps_the_span():
    factors = random_factors(3)
    result = run("iso_c", factors, [1.0] * 3)
    s = torch.linalg.svdvals(result)[:10]
    assert float(s.max() - s.min()) < 1e-9 * float(s.max())
    assert float(torch.linalg.svdvals(result)[10]) < 1e-9 * float(s.max())  # no direction outside the span
    space = core_space(factors)
    close(space.U @ space.U.T @ result @ space.V @ space.V.T, result)


def test_tsv_on_orthogonal_subspaces_is_task_arithmetic():
    generator = torch.Generator().manual_seed(4)
    left = torch.linalg.qr(torch.randn(30, 10, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(20, 10, generator=generator, dtype=torch.float64))[0]
    factors, start = [], 0
    for r in (3, 5, 2):  # disjoint column blocks: mutually orthogonal subspaces on both sides
        small = torch.randn(r, r, generator=generator, dtype=torch.float64)
        factors.append(LoraFactors(small @ right[:, start:start + r].T, left[:, start:start + r]))
        start += r
    close(run("tsv", factors, [1.0] * 3), sum(f.delta() for f in factors))


def test_core_ties_is_dense_ties_when_the_factors_span_the_space():
    factors = random_factors(5, shapes=((6, 5, 3), (6, 5, 3), (6, 5, 2)))  # R = 8 >= d
    space = core_space(factors)
    assert torch.allclose(space.U, torch.eye(6, dtype=torch.float64))
    assert torch.allclose(space.V, torch.eye(5, dtype=torch.float64))
    core = run("ties", factors, [1.0] * 3, rank=5, density=0.4, space="core")
    dense = run("ties", factors, [1.0] * 3, rank=5, density=0.4, space="full", exact_svd=True)
    close(core, dense)
    close(core, reference_ties([f.delta() for f in factors], 0.4))


def test_rank_truncates_and_parameters_are_checked():
    factors = random_factors(6)
    for method in ("tsv", "iso_c", "iso_cts", "star", "ctm"):
        assert torch.linalg.matrix_rank(run(method, factors, [1.0] * 3, rank=3)) == 3
    for method, params, pattern in [("iso_cts", {"common": 0.0}, "common"), ("star", {"eta": 1.5}, "eta"),
                                    ("ctm", {"beta": 2.0}, "beta"), ("ctm", {"density": 0.0}, "density"),
                                    ("tsv", {"rank": 0}, "rank")]:
        with pytest.raises(MethodError, match=pattern):
            run(method, factors, [1.0] * 3, **params)


# --- Pico and scale="norm" ----------------------------------------------------------------------------------

def test_pico_divides_a_direction_every_adapter_shares_by_T():
    generator = torch.Generator().manual_seed(7)
    shared = torch.randn(30, 1, generator=generator)
    factors = [LoraFactors(torch.randn(1, 20, generator=generator), shared.clone()) for _ in range(4)]
    calibrated = pico_calibrate(factors)
    for before, after in zip(factors, calibrated):
        torch.testing.assert_close(after.B, before.B / 4, rtol=1e-5, atol=1e-6)
        assert torch.equal(after.A, before.A)
    assert pico_calibrate(factors[:1])[0] is factors[0]  # one adapter: nothing is shared


def test_pico_keeps_rare_directions_more_than_shared_ones():
    generator = torch.Generator().manual_seed(8)
    shared = torch.randn(30, 1, generator=generator)
    own = torch.linalg.qr(torch.cat([shared, torch.randn(30, 3, generator=generator)], 1))[0][:, 1:]
    factors = [LoraFactors(torch.randn(2, 20, generator=generator),
                           torch.cat([shared, own[:, t:t + 1] * shared.norm()], 1)) for t in range(3)]
    calibrated = pico_calibrate(factors)
    kept_shared = float((calibrated[0].B[:, 0] @ shared[:, 0]) / shared.norm() ** 2)
    kept_own = float((calibrated[0].B[:, 1] @ own[:, 0]) / shared.norm())
    # energies 3 : 1 : 1 : 1 (shares 1/2, 1/6 ...): alpha = 1 / (1 + 2 s) = 0.5 shared, 0.75 for each own one
    assert kept_shared == pytest.approx(0.5, rel=1e-5) and kept_own == pytest.approx(0.75, rel=1e-5)


@pytest.mark.parametrize("method", ["ties", "lego", "tsv", "iso_c", "concat"])
def test_scale_norm_sets_each_module_to_the_inputs_mean_norm(method):
    adapters = [random_adapter("a", 4, seed=1), random_adapter("b", 2, seed=2), random_adapter("c", 3, seed=3)]
    weights = [1.0, 0.5, 2.0]
    merged = ll.merge(adapters, method, weights=weights, scale="norm")
    plain = ll.merge(adapters, method, weights=weights)
    for module, factors in merged.items():
        expected = sum(w * float(a[module].delta().norm()) for a, w in zip(adapters, weights)) / 3
        assert float(factors.delta().norm()) == pytest.approx(expected, rel=1e-4)
        ratio = float(factors.delta().norm() / plain[module].delta().norm())
        assert merged.metadata["report"][module]["norm_scale"] == pytest.approx(ratio, rel=1e-4)
    assert merged.metadata["provenance"]["params"]["scale"] == "norm"


def test_pico_runs_before_any_method_and_rescales():
    adapters = [random_adapter("a", 4, seed=1), random_adapter("b", 4, seed=2)]
    merged = ll.merge(adapters, "task_arithmetic", rank=8, pico=True)
    module = "model.layers.0.q_proj"
    calibrated = pico_calibrate([a[module] for a in adapters])
    expected = sum(f.delta() for f in calibrated)
    expected = expected * (sum(float(a[module].delta().norm()) for a in adapters) / 2 / float(expected.norm()))
    torch.testing.assert_close(merged[module].delta(), expected, rtol=1e-4, atol=1e-4)
    assert merged.metadata["provenance"]["params"]["pico"] is True
    with pytest.raises(MethodError, match="pico"):
        ll.merge(adapters, "ties", pico="yes")


def test_every_spectral_method_merges_peft_folders_of_mixed_ranks_through_the_cli(tmp_path, capsys):
    adapters = [random_adapter("a", 2, seed=1), random_adapter("b", 4, seed=2), random_adapter("c", 3, seed=3)]
    paths = []
    for adapter in adapters:
        ll.save_adapter(adapter, tmp_path / adapter.name)
        paths.append(str(tmp_path / adapter.name))
    for method, extra in [("tsv", []), ("iso_c", []), ("iso_cts", []), ("star", []), ("ctm", ["--rank", "3"]),
                          ("ties", ["--pico"]), ("iso_c", ["-p", "scale=norm"])]:
        out = tmp_path / f"out-{method}-{len(extra)}"
        assert main(["merge", *paths, "--method", method, "-o", str(out), "-q", *extra]) == 0, capsys.readouterr().err
        loaded = ll.load_adapter(out)
        params = {"rank": 3} if method == "ctm" else {}
        expected = ll.merge([ll.load_adapter(p) for p in paths], method, pico="--pico" in extra,
                            **({"scale": "norm"} if "scale=norm" in extra else {}), **params)
        for module, factors in expected.items():
            torch.testing.assert_close(loaded[module].delta(), factors.delta(), rtol=1e-5, atol=1e-5)
    # --target vllm must not truncate a whole-rank method to the largest input rank
    assert main(["merge", *paths, "--method", "tsv", "-o", str(tmp_path / "vllm"), "-q", "--target", "vllm"]) == 0
    assert ll.load_adapter(tmp_path / "vllm").max_rank == 9  # 2 + 4 + 3
    capsys.readouterr()
    assert main(["merge", *paths, "--method", "iso_c", "-o", str(tmp_path / "bad"), "-p", "scale=big"]) == 2
    assert "scale" in capsys.readouterr().err
