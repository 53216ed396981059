"""Evidence on a tiny Llama built from a config (no download): retention against a dense KL reference, its
exact values (1 for the adapter itself, 0 for the empty merge), order invariance, the Gram proxy against
dense outputs, the proxy's best scale, auto's choice where the answer is known, and the model card."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
import lora_lego as ll
from conftest import make_peft_adapter, tiny_llama_folder, write_prompts
from lora_lego.calibration.auto import Candidate, choose, merge_auto, scaled
from lora_lego.calibration.calibrate import load_model, read_prompts
from lora_lego.calibration.score import (
    Scorer,
    Scores,
    best_scale,
    gram_terms,
    log_bins,
    module_proxy_retention,
    module_scales,
    module_terms,
    proxy_retention,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evidence")
    base = tiny_llama_folder(folder / "model")
    a = ll.load_adapter(make_peft_adapter(folder, "a"))
    b = ll.load_adapter(make_peft_adapter(folder, "b", target_modules=["q_proj", "o_proj"], r=2, lora_alpha=4))
    prompts = [read_prompts(write_prompts(folder / f"p{i}.jsonl", n, seed=i)) for i, n in ((1, 9), (2, 7))]
    model, tokenizer = load_model(base)
    return {"base": base, "a": a, "b": b, "prompts": prompts, "model": model, "tokenizer": tokenizer}


def dense_kl(model, tokenizer, texts, p_adapter, q_adapter, positions):
    """Mean KL(p || q) over the scored positions, one prompt at a time, deltas added into the weights."""
    def logprobs(adapter, ids):
        modules = dict(model.named_modules())
        saved = {}
        with torch.no_grad():
            for name, factors in (adapter.items() if adapter is not None else []):
                saved[name] = modules[name].weight.clone()
                modules[name].weight += factors.delta()
            out = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for name, weight in saved.items():
                modules[name].weight.copy_(weight)
        return out if positions == "all" else out[-1:]

    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        p, q = logprobs(p_adapter, ids), logprobs(q_adapter, ids)
        total += float((p.exp() * (p - q)).sum())
        count += p.shape[0]
    return total / count


@pytest.mark.parametrize("positions", ["last", "all"])
def test_retention_matches_a_dense_kl_and_is_exact_at_the_ends(setup, positions):
    a, b, model, tokenizer = setup["a"], setup["b"], setup["model"], setup["tokenizer"]
    scorer = Scorer(model, tokenizer, [a, b], setup["prompts"], positions=positions, batch_size=4)
    merged = ll.merge([a, b], "ties", rank=4)
    scores = scorer.scores(merged)
    for t, adapter in enumerate([a, b]):  # vocabulary 100 <= top_k: the binned KL is the full KL
        texts = setup["prompts"][t]
        expected = dense_kl(model, tokenizer, texts, adapter, merged, positions)
        assert scores.kl_merged[t] == pytest.approx(expected, rel=1e-4)
        assert scores.kl_base[t] == pytest.approx(dense_kl(model, tokenizer, texts, adapter, None, positions), rel=1e-4)
    assert scorer.scores(a).retention[0] == 1.0  # the task model itself
    assert scorer.scores(b).retention[1] == 1.0
    assert scorer.scores(None).retention == [0.0, 0.0]  # the base model
    assert scorer.scores(ll.Adapter({}, {}, "empty")).retention == [0.0, 0.0]
    swapped = Scorer(model, tokenizer, [b, a], setup["prompts"][::-1], positions=positions, batch_size=4)
    assert swapped.scores(merged).retention == pytest.approx(scores.retention[::-1], abs=1e-9)


def test_binned_kl_is_a_lower_bound_and_bins_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(5, 50, generator=generator) * 3, torch.randn(5, 50, generator=generator) * 3
    top = p_logits.topk(6, dim=-1).indices
    bins_p, bins_q = log_bins(p_logits, top), log_bins(q_logits, top)
    assert torch.allclose(bins_p.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    full_p, full_q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    full = (full_p.exp() * (full_p - full_q)).sum(-1)
    binned = (bins_p.exp() * (bins_p - bins_q)).sum(-1)
    assert (binned <= full + 1e-12).all() and (binned > 0).all()


def test_gram_proxy_equals_dense_output_changes_and_best_scale_maximises_it(setup):
    a, b, model, tokenizer = setup["a"], setup["b"], setup["model"], setup["tokenizer"]
    union = list(dict.fromkeys([*a, *b]))
    calibrations = [ll.calibrate(model, p, tokenizer=tokenizer, modules=union) for p in setup["prompts"]]
    merged = ll.merge([a, b], "task_arithmetic", rank=3)
    terms = gram_terms(merged, [a, b], calibrations)
    for t, adapter in enumerate([a, b]):
        change = own = 0.0
        for module in union:
            gram = calibrations[t].gram(module).double()
            mine = adapter[module].delta().double() if module in adapter else torch.zeros(1)
            difference = merged[module].delta().double() - mine
            change += float(torch.trace(difference @ gram @ difference.T))
            own += float(torch.trace(mine @ gram @ mine.T)) if module in adapter else 0.0
        assert proxy_retention(terms)[t] == pytest.approx(1 - change / own, rel=1e-6)
    assert proxy_retention(gram_terms(a, [a, b], calibrations))[0] == pytest.approx(1.0)
    assert proxy_retention(terms, 0.0) == pytest.approx([0.0, 0.0])
    s = best_scale(terms)
    mean = lambda scale: sum(proxy_retention(terms, scale)) / 2  # noqa: E731
    assert mean(s) >= max(mean(s * 0.9), mean(s * 1.1), mean(1.0))
    per_module = module_terms(merged, [a, b], calibrations)  # per-module scales: never worse in the proxy
    assert module_proxy_retention(per_module, {m: 1.0 for m in per_module}) == pytest.approx(proxy_retention(terms))
    assert module_proxy_retention(per_module, {m: s for m in per_module}) == pytest.approx(proxy_retention(terms, s))
    assert sum(module_proxy_retention(per_module, module_scales(per_module))) / 2 >= mean(s) - 1e-12


def scores(mean_parts: list[float]) -> Scores:
    return Scores(["a", "b"], mean_parts, [0, 0], [1, 1], "last", [1, 1])


def test_choose_takes_the_best_mean_and_breaks_near_ties_by_the_worst_task():
    first = Candidate("tsv", {}, 1.0, scores([0.9, 0.3]), [])
    second = Candidate("ties", {}, 1.0, scores([0.6, 0.598]), [])
    third = Candidate("iso_c", {}, 1.0, scores([0.5, 0.5]), [])
    assert choose([third, first]) is first
    assert choose([first, second, third]) is second  # means 0.6 vs 0.599: within TIE, better worst task
    nan = Candidate("lego", {}, 1.0, scores([math.nan, 0.1]), [])
    assert choose([nan, third]) is third


def test_auto_finds_the_exact_answer_for_two_copies_of_one_adapter(setup):
    a = setup["a"]
    copy = ll.Adapter(dict(a.items()), dict(a.metadata), "a copy")
    result = merge_auto([a, copy], model=setup["model"], tokenizer=setup["tokenizer"],
                        prompts=[setup["prompts"][0]] * 2, methods=["task_arithmetic", "concat"], rank=4)
    auto = result.metadata["provenance"]["auto"]
    assert auto["chosen"].endswith("scale=0.5")  # the sum of two copies halved is the adapter itself
    assert min(result.metadata["provenance"]["retention"].values()) > 0.999999
    for module, factors in a.items():
        assert torch.allclose(result[module].delta(), factors.delta(), atol=1e-5)
    assert {c["method"] for c in auto["candidates"]} == {"task_arithmetic", "concat"}


def test_auto_is_deterministic_and_records_every_candidate(setup):
    kwargs = dict(model=setup["model"], tokenizer=setup["tokenizer"], prompts=setup["prompts"], rank=2,
                  methods=["ties", "tsv", "regmean"], search=False)
    first, second = (merge_auto([setup["a"], setup["b"]], **kwargs) for _ in range(2))
    assert first.metadata["provenance"]["auto"] == second.metadata["provenance"]["auto"]
    for module in first:
        assert torch.equal(first[module].A, second[module].A) and torch.equal(first[module].B, second[module].B)
    candidates = first.metadata["provenance"]["auto"]["candidates"]
    assert len(candidates) >= 3 and all(len(c["retention"]) == 2 for c in candidates)
    best = max(candidates, key=lambda c: c["mean_retention"])
    assert first.metadata["provenance"]["auto"]["chosen"] in [c["label"] for c in candidates]
    assert max(first.metadata["provenance"]["retention"].values()) <= 1.0
    assert sum(first.metadata["provenance"]["retention"].values()) / 2 >= best["mean_retention"] - 0.005


def test_scaled_multiplies_every_delta():
    factors = ll.LoraFactors(torch.ones(2, 3), torch.full((4, 2), 2.0))
    assert torch.allclose(scaled(ll.Adapter({"m": factors}), 0.25)["m"].delta(), 0.25 * factors.delta())


def test_model_card_front_matter_and_peft_ignores_it(tmp_path, setup):
    yaml = pytest.importorskip("yaml")
    peft = pytest.importorskip("peft")
    merged = ll.merge([setup["a"], setup["b"]], "ties", rank=2)
    merged.metadata["provenance"]["retention"] = {"a": 0.8, "b": -0.1}
    ll.save_adapter(merged, tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "peft" and "lora-lego" in front["tags"] and front["base_model"] == "tiny-llama"
    assert "`ties`" in text and "| `a` | 0.800 |" in text and "seed 0" in text
    assert (tmp_path / "out" / "retention.png").read_bytes()[:4] == b"\x89PNG"
    from conftest import tiny_llama

    model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out")
    assert model is not None
    ll.save_adapter(merged, tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_text() == text  # deterministic
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2


def test_a_candidate_that_sets_its_own_rank_is_refused():
    """Every candidate of auto is compared at one output rank (merge_auto's `rank`); a candidate string with its own
    rank would be merged at a rank nobody compared it at (it used to reach `merge` with the rank twice)."""
    from lora_lego.calibration.auto import candidate_specs
    from lora_lego.errors import MethodError

    assert candidate_specs(["tsv", "ties density=0.5"], calibrated=False) == [("tsv", {}), ("ties", {"density": "0.5"})]
    for candidate in ("tsv rank=4", "lego n_clusters=4", "lego rank=4"):  # lego's rank is n_clusters
        with pytest.raises(MethodError, match=f"'{candidate}' sets a rank"):
            candidate_specs([candidate], calibrated=False)
