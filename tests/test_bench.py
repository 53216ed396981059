"""Smoke test of the benchmark pipeline end to end (train -> merge -> evaluate -> report) on a tiny Llama
built from a config with a word-level tokenizer made in the test, and two user tasks from JSONL files.
Nothing is downloaded; the real benchmark runs SmolLM2-135M (see docs/results.md)."""

import json
import random

import pytest

pytest.importorskip("matplotlib")
from lora_lego.bench import EXPERIMENTS, run
from lora_lego.bench.stats import describe, paired_difference
from lora_lego.bench.tasks import get_task
from lora_lego.cli import main

WORDS = "the a sky grass sun snow is looks very bright blue green red white dog cat runs sleeps".split()
TASKS = {
    "colour": {"blue": ["sky"], "green": ["grass"], "white": ["snow"]},
    "animal": {"dog": ["runs"], "cat": ["sleeps"]},
}


def make_tasks(folder):
    """Two JSONL tasks whose label is given away by one cue word in the text."""
    rng = random.Random(0)
    paths = []
    for name, labels in TASKS.items():
        lines = []
        for i in range(60):
            label = rng.choice(sorted(labels))
            text = " ".join(rng.choice(WORDS) for _ in range(4)) + f" {labels[label][0]} {i}"
            lines.append(json.dumps({"text": text, "label": label}))
        path = folder / f"{name}.jsonl"
        path.write_text("\n".join(lines))
        paths.append(str(path))
    return paths


def make_model(folder):
    """A 2-layer Llama (hidden 32) and a whitespace word-level tokenizer, saved as a transformers folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["<pad>", "<unk>", "<eos>", "Answer:", "Classify", "the", "following", "text."] + WORDS
    vocab += [str(i) for i in range(60)]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(vocab))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=len(vocab)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_pipeline_runs_every_experiment_and_writes_reports(tmp_path):
    tasks = make_tasks(tmp_path)
    model = make_model(tmp_path / "model")
    out = run(["all"], cache=tmp_path / "cache", out=tmp_path / "out", tasks=tasks, model_dir=model, steps=3,
              n_test=20)
    text = (out / "results.md").read_text()
    for name in EXPERIMENTS:
        assert (out / f"{name}.png").stat().st_size > 0
        table = json.loads((out / f"{name}.json").read_text())
        values = [v for row in table["rows"].values() for v in row.values()]
        assert values and all(0.0 <= v <= 1.0 for v in values), name
        assert table["title"] in text
    main_table = json.loads((out / "main.json").read_text())
    assert {"zero-shot (base model)", "own LoRA (upper reference)", "lego (k=6)", "concat"} <= set(main_table["rows"])
    calibrated = json.loads((out / "calibrated.json").read_text())
    assert {"regmean (rank 12)", "regmean k=6", "lego_calibrated k=6", "regmean k=6, 300 prompts"} <= set(
        calibrated["rows"])
    assert calibrated["splits"] == {"dev": ["animal"], "confirm": ["colour"]}
    assert any("95% CI" in note for note in calibrated["notes"]) and "dev mean" in (out / "calibrated.md").read_text()
    assert (out / "calibrated_prompts.png").stat().st_size > 0
    assert len(list((tmp_path / "cache" / "calibrations").iterdir())) == 2 * 5  # 4 prompt counts + adapted
    # trained once, evaluated once: a second run reuses the cached adapters and evaluations
    adapters = sorted(p.name for p in (tmp_path / "cache" / "adapters").iterdir())
    assert len(adapters) == 5  # two tasks at r=6 for each of two training seeds (protocol), one at r=12 (hetero)
    protocol = json.loads((out / "protocol.json").read_text())
    dev_only = [row for row in protocol["rows"].values() if set(row) == {"animal"}]
    complete = [label for label, row in protocol["rows"].items() if set(row) == {"animal", "colour"}]
    assert len(dev_only) >= 10 and "ties k=6" in complete and len(complete) >= 4  # references, ties, finalists
    assert all("mean" in protocol["summary"][label] for label in complete)
    assert any(note.startswith("Best on the confirm tasks") for note in protocol["notes"])
    evaluations = (out / "evaluations.json").read_text()
    run(["main"], cache=tmp_path / "cache", out=tmp_path / "out", tasks=tasks, model_dir=model, steps=3, n_test=20)
    assert (out / "evaluations.json").read_text() == evaluations


def test_paired_difference_by_hand():
    first, second = {"a": [1, 1, 0, 0], "b": [1, 0]}, {"a": [0, 1, 0, 1], "b": [0, 0]}
    # task a: differences 1, 0, 0, -1 (mean 0, variance of the mean 0.5 / 4); task b: 1, 0 (mean 0.5, 0.25 / 2)
    difference, low, high = paired_difference(first, second, ["a", "b"])
    assert difference == pytest.approx(0.25)
    assert (low, high) == pytest.approx((0.25 - 1.96 * 0.25, 0.25 + 1.96 * 0.25))
    assert "beats" in describe("x", "y", (0.1, 0.05, 0.15), "dev")
    assert "includes 0" in describe("x", "y", (0.1, -0.1, 0.3), "dev")


def test_protocol_notes_give_each_training_seed_its_own_interval():
    """Two seeds; tsv beats ties clearly on seed 0, ties by a little on seed 1: the pooled interval and one
    interval per seed are stated, so a reader sees whether the winner holds on each seed alone."""
    from types import SimpleNamespace

    from lora_lego.bench.experiments import Table
    from lora_lego.bench.protocol import Variant, _notes

    ties, tsv = Variant("ties", "ties k=6", "ties"), Variant("tsv", "tsv (rank 12)", "tsv")
    task = SimpleNamespace(name="t")
    rows = {0: {"merge ties": [1, 0] * 50, "merge tsv": [1, 1] * 50},
            1: {"merge ties": [1, 1] * 50, "merge tsv": [1, 1] * 45 + [1, 0] * 5}}
    views = [SimpleNamespace(config=SimpleNamespace(seed=seed), rows=lambda key, t, seed=seed: rows[seed][key])
             for seed in (0, 1)]
    table = Table("protocol", ["t"], rows={label: {"t": 0.5} for label in (ties.label, tsv.label)})
    table.rows[tsv.label]["t"] = 0.6
    _notes(table, views, [ties, tsv], {"ties": ties, "tsv": tsv}, [ties, tsv], ties, [task], [task], 6, 12)
    alone = [note for note in table.notes if "training seed" in note and "alone" in note]
    assert len(alone) == 2
    assert alone[0].startswith("tsv (rank 12) - ties k=6 on confirm tasks, training seed 0 alone: +0.500")
    assert alone[0].endswith("beats ties k=6") and "training seed 1 alone: -0.050" in alone[1]
    pooled = next(note for note in table.notes if note.endswith("beats ties k=6") and "alone" not in note)
    assert "+0.225" in pooled  # rows averaged over the seeds: (0.5 - 0.05) / 2


def test_protocol_variants_are_distinct_and_registered():
    """Rows are keyed by label and evaluations by key: two variants sharing either would silently overwrite
    each other's numbers. The reference must be among the variants, and each method must be data-free."""
    from lora_lego.bench.protocol import REFERENCE, variants
    from lora_lego.methods import get_method

    tried = variants(6, 48)
    assert len({v.label for v in tried}) == len({v.key() for v in tried}) == len(tried)
    assert REFERENCE in [v.method for v in tried]
    assert not any(get_method(v.method).needs_calibration for v in tried)


def test_user_task_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(Exception, match="line 1 is not a JSON object with text and label"):
        get_task(str(bad))
    assert main(["bench", "nonsense", "--cache", str(tmp_path)]) == 2
    assert "unknown experiment" in capsys.readouterr().err


def test_training_configurations_keep_their_cache_keys():
    """The keys name cached LoRAs and evaluations: a new field at its default must not rename them (these
    are the keys of before `precision` existed), and a float32 run must not reuse bf16 results."""
    from dataclasses import replace

    from lora_lego.bench.lm import TrainConfig

    assert [TrainConfig().key(), replace(TrainConfig(), seed=1).key()] == ["68d67f29", "705f9a7e"]
    assert TrainConfig(precision="fp32").key() not in {TrainConfig().key(), replace(TrainConfig(), seed=1).key()}


def test_precision_auto_follows_the_hardware_and_fp32_runs_without_autocast(tmp_path, capsys):
    import torch

    from lora_lego.bench.lm import last_logits, load_base, native_bf16, resolve_precision
    from lora_lego.errors import LoraLegoError

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert [resolve_precision(p, cpu) for p in ("bf16", "fp32")] == ["bf16", "fp32"]
    with pytest.raises(LoraLegoError, match="precision must be auto, bf16 or fp32; got 'fp16'"):
        resolve_precision("fp16", cpu)
    model, tokenizer = load_base(make_model(tmp_path / "model"))
    prompts = ["the sky is blue Answer:", "a dog runs"]
    with torch.no_grad():
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
        mask = encoded.attention_mask
        plain = model(input_ids=encoded.input_ids, attention_mask=mask,
                      position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits[:, -1]
        errors = [(last_logits(model, tokenizer, prompts, 16, p) - plain).abs().max() for p in ("fp32", "bf16")]
    assert errors[0] < 1e-6 and 1e-4 < errors[1] < 0.05, errors  # float32 rounding only; bf16's 8-bit mantissa
    assert main(["bench", "main", "--cache", str(tmp_path), "--device", "gpu"]) == 2
    assert "device must be 'cpu', 'cuda' or 'cuda:N'; got 'gpu'" in capsys.readouterr().err


def test_evidence_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    from lora_lego.bench.evidence import spearman

    x, y = [0.1, 0.5, 0.5, 0.9, -0.2, 0.3], [0.0, 0.7, 0.2, 1.0, -0.5, 0.7]
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
