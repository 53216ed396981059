import json
import subprocess
import sys

import pytest
import torch

import lora_lego as ll
from lora_lego.cli import main
from lora_lego.methods.registry import DEFAULT_METHOD
from synthetic import random_adapter


@pytest.fixture()
def folders(tmp_path):
    paths = []
    for seed, (name, rank) in enumerate([("a", 4), ("b", 4), ("c", 8)]):
        path = tmp_path / name
        ll.save_adapter(random_adapter(name, rank, seed=seed), path)
        paths.append(str(path))
    return paths


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in err


def test_methods_lists_the_registry(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    listing, _, footer = out.partition("\n\n")
    titles = [line for line in listing.splitlines() if not line.startswith(" ")]
    assert [t.split()[0].rstrip(",") for t in titles] == ll.available_methods() + ["regmean_pp", "auto"]
    assert f"{DEFAULT_METHOD} (default)" in titles and "task_arithmetic, also 'svd' (default of prune)" in titles
    assert "2409.16167" in out and "-p scale=norm" in footer


def test_methods_shows_each_parameters_meaning_and_allowed_values(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    text = " ".join(out.split())  # long lines wrap
    assert ("sign = total (total | frequency): sign election: total (the sign of the sum of values) or frequency "
            "(the majority of signs)") in text
    assert "density = 0.5 (number): fraction of each delta's entries kept (the largest), in (0, 1]" in text
    assert "n_clusters = none (integer or none; --rank): number of clusters k, the output rank" in text
    assert "param_norm = inf (inf | l2 | off): rescale each centroid" in text
    assert "exact_svd = false (true | false):" in text and "concat Exact weighted sum" in text
    assert max(len(line) for line in out.splitlines() if line.startswith("    ")) <= 110


def test_rank_help_says_its_default_depends_on_the_method(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "its default depends on the method: the largest input rank" in text
    whole = [name for name in ll.available_methods() if ll.get_method(name).whole_rank]
    assert whole and all(name in text for name in whole)  # the help names every whole-rank method
    assert "the sum of the input ranks for regmean" in text
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "output rank k (required)" in " ".join(capsys.readouterr().out.split())


def test_merge_lego_writes_a_loadable_folder_and_report(capsys, folders, tmp_path):
    out_dir, report = tmp_path / "out", tmp_path / "report.json"
    code, out, err = run(capsys, "merge", *folders, "-o", str(out_dir), "--method", "lego", "--rank", "4",
                         "--seed", "3", "-p", "n_init=2", "--report", str(report), "-q")
    assert code == 0, err
    assert "-> " in out and "rank 4" in out
    merged = ll.load_adapter(out_dir)
    assert {f.rank for f in merged.modules.values()} == {4}
    data = json.loads(report.read_text())
    assert data["provenance"]["params"] == {"n_clusters": 4, "n_init": 2} and data["provenance"]["seed"] == 3
    module = next(iter(data["modules"].values()))
    assert sum(module["cluster_sizes"]) == 16 and len(module["labels"]) == 16
    distance = sum(m["relative_error"] for m in data["modules"].values()) / len(data["modules"])
    assert f"distance from the exact sum {distance:.3g} (0 = the weighted sum of the deltas" in out
    assert "not a quality score" in out and "note: data-free merges vary with the adapters" in out
    code, out, _ = run(capsys, "inspect", str(report))
    assert code == 0 and "method lego" in out and "cluster sizes" in out
    assert f"so it is not a quality score): mean {distance:.4f}" in out
    assert "retention: not measured" in out


def test_exactly_cancelling_deltas_print_no_inf(capsys, folders, tmp_path):
    code, out, err = run(capsys, "merge", folders[0], folders[0], "--weights", "1", "-1", "--method", "concat",
                         "-o", str(tmp_path / "zero"), "-q")
    assert code == 0, err
    assert "sum inf" not in out and "2 module(s) whose deltas cancel exactly left out" in out


def test_concat_with_weights_is_exact(capsys, folders, tmp_path):
    code, _, err = run(capsys, "merge", *folders, "-o", str(tmp_path / "out"), "--method", "concat",
                       "--weights", "1", "-0.5", "2", "--dtype", "fp32", "-q")
    assert code == 0, err
    merged = ll.load_adapter(tmp_path / "out")
    sources = [ll.load_adapter(f) for f in folders]
    module = "model.layers.1.down_proj"
    expected = sources[0][module].delta() - 0.5 * sources[1][module].delta() + 2 * sources[2][module].delta()
    torch.testing.assert_close(merged[module].delta(), expected, rtol=1e-5, atol=1e-5)


def test_prune(capsys, folders, tmp_path):
    code, out, err = run(capsys, "prune", folders[2], "-o", str(tmp_path / "pruned"), "--rank", "3", "-q")
    assert code == 0, err
    assert "with task_arithmetic" in out  # the default: the truncated SVD ("svd"), the best measured
    pruned = ll.load_adapter(tmp_path / "pruned")
    assert {f.rank for f in pruned.modules.values()} == {3}
    truncated = ll.merge([ll.load_adapter(folders[2])], "task_arithmetic", rank=3)
    for module in truncated:
        torch.testing.assert_close(pruned[module].delta(), truncated[module].delta(), rtol=1e-5, atol=1e-6)
    code, out, err = run(capsys, "prune", folders[2], "-o", str(tmp_path / "lego"), "--rank", "3", "--method", "lego",
                         "-q")
    assert code == 0 and "with lego" in out, err
    code, _, err = run(capsys, "prune", folders[2], "-o", str(tmp_path / "p2"))
    assert_one_line_error(code, err, "--rank")


def test_prune_defaults_to_the_truncated_svd_in_python_too(folders):
    adapter = ll.load_adapter(folders[2])
    assert ll.prune(adapter, rank=2).metadata["provenance"]["method"] == "task_arithmetic"
    assert ll.prune(adapter, rank=2, method="lego").metadata["provenance"]["method"] == "lego"


def test_existing_output_needs_overwrite(capsys, folders, tmp_path):
    out_dir = tmp_path / "out"
    assert run(capsys, "merge", *folders, "-o", str(out_dir), "--method", "concat", "-q")[0] == 0
    first = (out_dir / "adapter_model.safetensors").read_bytes()
    code, _, err = run(capsys, "merge", *folders[:2], "-o", str(out_dir), "--method", "concat", "-q")
    assert_one_line_error(code, err, "already exists")
    assert (out_dir / "adapter_model.safetensors").read_bytes() == first
    code, _, err = run(capsys, "merge", *folders[:2], "-o", str(out_dir), "--method", "concat", "--overwrite", "-q")
    assert code == 0, err
    assert ll.load_adapter(out_dir).max_rank == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "out"]  # nothing temporary left


@pytest.mark.parametrize("argv, pattern", [
    (["merge", "{missing}", "-o", "{out}"], "no such folder"),
    (["merge", "{a}", "-o", "{out}", "--method", "nope"], "unknown merge method 'nope'"),
    (["merge", "{a}", "-o", "{out}", "-p", "n_init"], "key=value"),
    (["merge", "{a}", "-o", "{out}", "-p", "bogus=1"], "no parameter 'bogus'"),
    (["merge", "{a}", "-o", "{out}", "--method", "lego", "-p", "n_init=3", "-p", "n_init=5"],
     "method parameter 'n_init' is given twice (-p n_init=3 and -p n_init=5)"),
    (["merge", "{a}", "-o", "{out}", "--rank", "4", "-p", "rank=8"],
     "the rank is given twice (--rank 4 and -p rank=8)"),
    (["merge", "{a}", "-o", "{out}", "--method", "lego", "-p", "n_init=x"], "must be an integer"),
    (["merge", "{a}", "-o", "{out}", "--rank", "0"], "must be an integer >= 1"),
    (["merge", "{a}", "{b}", "-o", "{out}", "--weights", "1"], "2 adapters"),
    (["merge", "{a}", "-o", "{a}/inner", "--method", "concat"], "lies inside input"),
    (["merge", "{a}", "-o", "{out}", "--method", "concat", "--rank", "4"], "no parameter 'rank'"),
    (["merge", "-o", "{out}"], "arguments are required"),
    (["frobnicate"], "invalid choice"),
])
def test_errors_are_one_line_exit_2(capsys, folders, tmp_path, argv, pattern):
    values = {"a": folders[0], "b": folders[1], "missing": str(tmp_path / "missing"), "out": str(tmp_path / "out")}
    code, _, err = run(capsys, *[arg.format(**values) for arg in argv])
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "out").exists()


def test_debug_shows_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "--debug", "merge", str(tmp_path / "missing"), "-o", str(tmp_path / "out"))
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_inspect_adapters(capsys, folders):
    code, out, err = run(capsys, "inspect", *folders[:2])
    assert code == 0, err
    assert out.count("adapter ") >= 2 and "ranks: 4 (6 modules)" in out
    assert "shared modules: 6 of 6" in out and "q_proj" in out and "cosine of deltas" in out
    code, out, _ = run(capsys, "inspect", folders[0], folders[0])
    assert "q_proj +1.000" in out


def test_python_dash_m_entry_point(folders):
    result = subprocess.run([sys.executable, "-m", "lora_lego", "inspect", folders[0]], capture_output=True, text=True)
    assert result.returncode == 0 and "parameters:" in result.stdout
    result = subprocess.run([sys.executable, "-m", "lora_lego", "merge", "nowhere", "-o", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == "error: adapter 'nowhere': no such folder"


def test_threads_option_gives_the_same_merge(capsys, folders, tmp_path):
    for threads in ("1", "3"):
        code, _, err = run(capsys, "merge", *folders, "-o", str(tmp_path / threads), "--threads", threads, "-q")
        assert code == 0, err
    one, three = ll.load_adapter(tmp_path / "1"), ll.load_adapter(tmp_path / "3")
    for module in one:
        assert torch.equal(one[module].A, three[module].A) and torch.equal(one[module].B, three[module].B)
    code, _, err = run(capsys, "merge", *folders, "-o", str(tmp_path / "0"), "--threads", "0", "-q")
    assert_one_line_error(code, err, "threads must be an integer >= 1; got 0")
    assert not (tmp_path / "0").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_a_gpu_fails_before_loading(capsys, folders, tmp_path):
    code, _, err = run(capsys, "merge", *folders, "-o", str(tmp_path / "out"), "--device", "cuda", "-q")
    assert_one_line_error(code, err, "CUDA is not available to torch")
    assert not (tmp_path / "out").exists()


def test_every_command_file_is_registered_and_names_its_runner():
    """A command is one file in cli/ with `add_parser(commands)`, listed once in `cli.COMMANDS`; each subcommand
    it adds sets `run`, the function the command line calls (issue 31)."""
    import importlib
    import pkgutil

    from lora_lego import cli

    files = {info.name for info in pkgutil.iter_modules(cli.__path__)
             if hasattr(importlib.import_module(f"lora_lego.cli.{info.name}"), "add_parser")}
    assert files == {command.__name__.rsplit(".", 1)[1] for command in cli.COMMANDS}
    subcommands = cli.build_parser()._subparsers._group_actions[0].choices
    assert {"merge", "prune", "methods", "formats", "inspect", "run"} <= set(subcommands)
    for name, parser in subcommands.items():
        assert callable(parser.get_default("run")), name
