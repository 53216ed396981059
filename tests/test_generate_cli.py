"""`--generate-prompts N` end to end on a tiny Llama and PEFT adapters: `merge --method regmean` calibrated on
each adapter's own samples (the same merge as the library's, PEFT loads it, the provenance says how the prompts
were made), `calibrate --adapter` and `score`, and the one-line errors of the options that do not fit."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from conftest import load_peft, make_peft_adapter, peft_deltas, tiny_llama_folder, write_prompts  # noqa: E402

import lora_lego as ll  # noqa: E402
from lora_lego.calibrate import load_model  # noqa: E402
from lora_lego.cli import main  # noqa: E402
from lora_lego.generate import generate_prompts  # noqa: E402

RECORD = {"n": 4, "seed": 7, "start": "bos", "temperature": 0.8, "top_p": 0.9, "max_length": 6}
OPTIONS = ["--generate-prompts", "4", "--generate-seed", "7", "--generate-start", "bos", "--temperature", "0.8",
           "--top-p", "0.9", "--generate-length", "6", "-q"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate-cli")
    model = tiny_llama_folder(root / "model")
    adapters = [make_peft_adapter(root / "inputs", "x"), make_peft_adapter(root / "inputs", "y", r=2, lora_alpha=4)]
    return root, model, adapters


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def library_prompts(model_dir, adapters):
    model, tokenizer = load_model(model_dir)
    return model, tokenizer, [generate_prompts(model, tokenizer, a, 4, max_length=6, temperature=0.8, top_p=0.9,
                                               seed=7, start="bos") for a in adapters]


def test_merge_regmean_on_generated_prompts_is_the_library_merge_and_peft_loads_it(setup, tmp_path, capsys):
    root, model_dir, paths = setup
    out, report = tmp_path / "merged", tmp_path / "merged.json"
    code, stdout, err = run(capsys, "merge", *paths, "--method", "regmean", "--rank", "2", "--model", model_dir,
                            *OPTIONS, "-o", out, "--report", report)
    assert code == 0, err
    assert json.loads(report.read_text())["provenance"]["generated_prompts"] == RECORD
    assert "mean retention" in stdout
    adapters = [ll.load_adapter(p) for p in paths]
    model, tokenizer, prompts = library_prompts(model_dir, adapters)
    assert prompts[0] != prompts[1]  # one set per adapter, each from its own adapter
    calibrations = [ll.calibrate(model, p, tokenizer=tokenizer, modules=list(a)) for a, p in zip(adapters, prompts)]
    expected = ll.merge(adapters, "regmean", rank=2, calibration=calibrations)
    written = ll.load_adapter(out)
    deltas = peft_deltas(load_peft(out))
    for module, factors in expected.items():
        assert torch.allclose(written[module].delta(), factors.delta(), atol=1e-5)
        key = next(k for k in deltas if k.endswith(module))
        assert torch.allclose(deltas[key], factors.delta(), atol=1e-5)


def test_calibrate_and_score_take_generated_prompts(setup, tmp_path, capsys):
    root, model_dir, paths = setup
    code, stdout, err = run(capsys, "calibrate", "--model", model_dir, "--adapter", paths[0], *OPTIONS,
                            "-o", tmp_path / "calib")
    assert code == 0, err
    calibration = ll.load_calibration(tmp_path / "calib")
    assert calibration.metadata["generated_prompts"] == RECORD and calibration.metadata["n_prompts"] == 4
    adapters = [ll.load_adapter(p) for p in paths]
    model, tokenizer, prompts = library_prompts(model_dir, adapters)
    expected = ll.calibrate(model, prompts[0], tokenizer=tokenizer, modules=list(adapters[0]), adapter=adapters[0])
    module = next(iter(adapters[0]))
    assert torch.allclose(calibration.gram(module), expected.gram(module), atol=1e-4)
    merged = tmp_path / "ta"
    assert run(capsys, "merge", *paths, "--method", "task_arithmetic", "-o", merged, "-q")[0] == 0
    code, stdout, err = run(capsys, "score", merged, "--adapters", *paths, "--model", model_dir, *OPTIONS,
                            "--report", tmp_path / "scores.json")
    assert code == 0, err
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["generated_prompts"] == RECORD
    result = ll.score(ll.load_adapter(merged), adapters, model=model, tokenizer=tokenizer, prompts=prompts)
    assert [row["retention"] for row in scores["adapters"]] == pytest.approx(result.retention)


def test_auto_chooses_on_generated_prompts(setup, tmp_path, capsys):
    root, model_dir, paths = setup
    code, stdout, err = run(capsys, "merge", *paths, "--method", "auto", "--rank", "2", "--model", model_dir, *OPTIONS,
                            "-o", tmp_path / "auto", "--report", tmp_path / "auto.json")
    assert code == 0, err
    provenance = json.loads((tmp_path / "auto.json").read_text())["provenance"]
    assert provenance["generated_prompts"] == RECORD and provenance["auto"]["n_prompts"] == [4, 4]
    assert provenance["auto"]["chosen"] in stdout


@pytest.mark.parametrize("argv, message", [
    (["merge", "{a}", "{b}", "--method", "regmean", "--model", "{m}", "--generate-prompts", "2", "--prompts", "{p}",
      "{p}"], "either --prompts FILE ... or --generate-prompts N, not both"),
    (["merge", "{a}", "{b}", "--method", "regmean", "--generate-prompts", "2"], "--generate-prompts needs --model"),
    (["merge", "{a}", "{b}", "--method", "regmean", "--model", "{m}", "--generate-prompts", "0"],
     "--generate-prompts must be >= 1; got 0"),
    (["merge", "{a}", "{b}", "--method", "regmean", "--model", "{m}", "--generate-prompts", "2", "--top-p", "2"],
     "top_p must be in (0, 1]"),
    (["calibrate", "--model", "{m}", "--generate-prompts", "2"], "give --adapter"),
    (["calibrate", "--model", "{m}"], "give --prompts FILE, or --generate-prompts N"),
    (["score", "{a}", "--adapters", "{a}", "--model", "{m}", "--generate-prompts", "-1"], "must be >= 1"),
    (["score", "{a}", "--adapters", "{a}", "--model", "{m}"], "--prompts P1 P2 ... or --generate-prompts N"),
])
def test_options_that_do_not_fit_are_one_line_errors(setup, tmp_path, capsys, argv, message):
    root, model_dir, paths = setup
    prompts = write_prompts(tmp_path / "p.jsonl", 3, seed=0)
    values = {"a": paths[0], "b": paths[1], "m": model_dir, "p": prompts}
    argv = [arg.format(**values) for arg in argv] + ["-o" if argv[0] != "score" else "--report",
                                                     str(tmp_path / ("out" if argv[0] != "score" else "r.json"))]
    code, stdout, err = run(capsys, *argv)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()
