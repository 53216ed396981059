"""The evidence commands end to end on a tiny Llama and PEFT adapters: `merge --model/--prompts` scores any
merge, `merge --method auto` and `-p scale=auto` choose on the prompts, `score` prints and writes the table,
and their bad inputs are one-line errors that leave nothing behind."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
import lora_lego as ll
from conftest import make_peft_adapter, run_cli, tiny_llama_folder, write_prompts


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evidence-cli")
    model = tiny_llama_folder(root / "model")
    adapters = [make_peft_adapter(root / "inputs", "x"), make_peft_adapter(root / "inputs", "y", r=2, lora_alpha=4)]
    prompts = [write_prompts(root / f"p{i}.jsonl", 6, seed=i) for i in range(2)]
    return root, model, adapters, prompts


run = run_cli


def test_a_merge_with_prompts_is_scored_and_its_card_says_so(setup, tmp_path, capsys):
    root, model, adapters, prompts = setup
    out = tmp_path / "merged"
    code, stdout, err = run(capsys, "merge", *adapters, "--method", "ties", "--model", model, "--prompts", *prompts,
                            "-o", out, "-q")
    assert code == 0, err
    assert "retention  KL(task||merged)" in stdout and "mean retention" in stdout and "note:" not in stdout
    card = (out / "README.md").read_text()
    assert "## What each adapter kept" in card and (out / "retention.png").exists()
    expected = ll.score(ll.load_adapter(out), [ll.load_adapter(a) for a in adapters], model=model, prompts=prompts)
    line = next(line for line in stdout.splitlines() if line.startswith("merge:"))
    assert f"mean retention {expected.mean:.3f}" in line and "not a quality score" in line


def test_a_merge_without_prompts_says_how_to_measure(setup, tmp_path, capsys):
    root, model, adapters, prompts = setup
    code, stdout, _ = run(capsys, "merge", *adapters, "-o", tmp_path / "m", "-q")
    assert code == 0 and "note: data-free merges vary with the adapters" in stdout
    assert "with ties:" in stdout  # the default method
    assert "Not measured on prompts" in (tmp_path / "m" / "README.md").read_text()


def test_auto_and_scale_auto_choose_on_the_prompts(setup, tmp_path, capsys):
    root, model, adapters, prompts = setup
    code, stdout, err = run(capsys, "merge", *adapters, "--method", "auto", "--model", model, "--prompts", *prompts,
                            "-o", tmp_path / "auto", "--rank", "2", "-q", "--report", tmp_path / "auto.json")
    assert code == 0, err
    provenance = json.loads((tmp_path / "auto.json").read_text())["provenance"]
    auto = provenance["auto"]
    assert {c["method"] for c in auto["candidates"]} >= {"tsv", "ties", "iso_c", "regmean", "lego_calibrated"}
    assert f"*{auto['chosen']}" in stdout and f"(auto: {auto['chosen']})" in stdout
    assert "Chosen by `--method auto`" in (tmp_path / "auto" / "README.md").read_text()
    code, stdout, err = run(capsys, "merge", *adapters, "--method", "tsv", "-p", "scale=auto", "--model", model,
                            "--prompts", *prompts, "-o", tmp_path / "scaled", "-q")
    assert code == 0, err
    assert {line.split()[0].lstrip("*") for line in stdout.splitlines()[1:-1]} == {"tsv"}


def test_score_prints_and_writes_the_table(setup, tmp_path, capsys):
    root, model, adapters, prompts = setup
    merged = tmp_path / "merged"
    assert run(capsys, "merge", *adapters, "-o", merged, "-q")[0] == 0
    code, stdout, err = run(capsys, "score", merged, "--adapters", *adapters, "--model", model, "--prompts", *prompts,
                            "--report", tmp_path / "s.json", "--plot", tmp_path / "s.png", "-q", "--positions", "all")
    assert code == 0, err
    data = json.loads((tmp_path / "s.json").read_text())
    assert [row["adapter"] for row in data["adapters"]] == [str(a) for a in adapters]
    assert data["positions"] == "all" and f"mean retention {data['mean_retention']:.3f}" in stdout
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_evidence_errors_are_one_line_and_leave_nothing(setup, tmp_path, capsys):
    root, model, adapters, prompts = setup
    before = set(tmp_path.iterdir())
    out = tmp_path / "out"
    cases = [
        (["merge", *adapters, "--method", "auto", "-o", out], "--method auto scores merges on the adapters' prompts"),
        (["merge", *adapters, "-p", "scale=auto", "-o", out], "-p scale=auto scores merges"),
        (["merge", *adapters, "--prompts", *prompts, "-o", out], "--prompts needs --model"),
        (["merge", *adapters, "--model", model, "-o", out], "--model is used with --prompts"),
        (["merge", *adapters, "--model", model, "--prompts", prompts[0], "-o", out], "got 1 prompts files for 2"),
        (["merge", *adapters, "--method", "auto", "--pico", "--model", model, "--prompts", *prompts, "-o", out],
         "--pico is not a candidate"),
        (["score", adapters[0], "--adapters", *adapters, "--model", model, "--prompts", prompts[0]],
         "got 1 prompts files for 2 adapters"),
        (["score", adapters[0], "--adapters", *adapters, "--model", model, "--prompts", *prompts, "--plot",
          tmp_path / "x.jpg"], "expected a .png file name"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and "\n" not in err, (argv, err)
    assert set(tmp_path.iterdir()) == before
