"""Progress: a plain line every few seconds when stderr is not a terminal (a log), a tqdm bar on a terminal,
nothing with -q, for merge, calibrate, apply and score."""

from __future__ import annotations

import io

import pytest

import lora_lego as ll
from lora_lego import progress as progress_module
from lora_lego.cli import main
from lora_lego.progress import LineProgress, progress
from synthetic import random_adapter


@pytest.fixture()
def every_update(monkeypatch):
    """A progress line at every update (the interval is 5 s in real use)."""
    monkeypatch.setattr(progress_module, "INTERVAL", 0.0)


def progress_lines(err: str, prefix: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(prefix)]


def test_line_progress_writes_counts_and_a_last_line(every_update, capsys):
    with progress(4, "work", "module") as bar:
        assert isinstance(bar, LineProgress)  # capsys' stderr is not a terminal
        for _ in range(4):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("work: 1/4 modules (25%), ") and "left" in lines[0]
    assert lines[-1].startswith("work: 4/4 modules (100%), ") and lines[-1].endswith("done")


def test_quick_work_writes_nothing_and_disabled_never_writes(capsys, every_update):
    assert list(progress(3, "x", "item", enabled=False, iterable=range(3))) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    progress_module.INTERVAL = 60.0
    assert list(progress(3, "x", "item", iterable=range(3))) == [0, 1, 2]  # done before the first line is due
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    bar = progress(2, "x", "item")
    assert type(bar).__name__ != "LineProgress" and hasattr(bar, "update")
    bar.close()


@pytest.fixture()
def folders(tmp_path):
    paths = []
    for seed, name in enumerate("ab"):
        ll.save_adapter(random_adapter(name, 4, seed=seed), tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


def test_merge_writes_progress_lines_to_a_log_and_none_with_quiet(folders, tmp_path, capsys, every_update):
    assert main(["merge", *folders, "-o", str(tmp_path / "m1"), "--method", "ties"]) == 0
    err = capsys.readouterr().err
    assert progress_lines(err, "merge (ties): ") and "done" in progress_lines(err, "merge (ties): ")[-1]
    assert main(["merge", *folders, "-o", str(tmp_path / "m2"), "--method", "ties", "-q"]) == 0
    assert "merge (ties)" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    pytest.importorskip("transformers")
    from conftest import make_peft_adapter, tiny_llama_folder, write_prompts

    root = tmp_path_factory.mktemp("progress")
    model = tiny_llama_folder(root / "model")
    adapters = [make_peft_adapter(root / "inputs", "x"), make_peft_adapter(root / "inputs", "y")]
    prompts = [write_prompts(root / f"p{i}.jsonl", 4, seed=i) for i in range(2)]
    return model, adapters, prompts


@pytest.mark.parametrize("quiet", [False, True])
def test_calibrate_apply_and_score_progress(llm, tmp_path, capsys, every_update, quiet):
    model, adapters, prompts = llm
    q = ["-q"] if quiet else []
    steps = [(["calibrate", "--model", model, "--prompts", prompts[0], "-o", tmp_path / "calib"], "calibrate "),
             (["apply", adapters[0], "--base", model, "-o", tmp_path / "applied"], "apply: "),
             (["score", adapters[0], "--adapters", *adapters, "--model", model, "--prompts", *prompts], "score: ")]
    for argv, prefix in steps:
        assert main([str(a) for a in argv + q]) == 0
        lines = progress_lines(capsys.readouterr().err, prefix)
        assert (lines == []) if quiet else lines, (argv[0], lines)
