"""Recipes: `lora-lego run recipe.yaml` validates the whole file first (one line per problem, naming the key),
runs the merges in order or in --jobs processes through the merge command's own code, each output records the
recipe, and `inspect --recipe` prints a recipe back from any of our outputs (recorded or rebuilt)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lora_lego as ll
from lora_lego.cli import main
from synthetic import random_adapter

yaml = pytest.importorskip("yaml")


@pytest.fixture()
def here(tmp_path, monkeypatch):
    """tmp_path as the working folder, with adapters a, b (rank 4) and c (rank 2) and prompts p.jsonl."""
    monkeypatch.chdir(tmp_path)
    for seed, (name, rank) in enumerate([("a", 4), ("b", 4), ("c", 2)]):
        ll.save_adapter(random_adapter(name, rank, seed=seed), tmp_path / name)
    (tmp_path / "p.jsonl").write_text('{"text": "hello"}\n')
    return tmp_path


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return Path(path.name)  # as a user names it, from the working folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


GOOD = {"inputs": ["a", {"path": "b", "weight": 0.5}], "output": "out", "method": "ties", "rank": 3,
        "params": {"density": 0.5}, "seed": 2}


@pytest.mark.parametrize("change, expected", [
    ({"method": "foo"}, "r.yaml: merges[0].method: unknown merge method 'foo'"),
    ({"colour": "red"}, "r.yaml: merges[0].colour: unknown key (expected inputs, output, method"),
    ({"output": None}, "r.yaml: merges[0].output: expected a non-empty string; got None"),
    ({"rank": "four"}, "r.yaml: merges[0].rank: expected an integer >= 1; got 'four'"),
    ({"rank": 0}, "r.yaml: merges[0].rank: expected an integer >= 1; got 0"),
    ({"seed": True}, "r.yaml: merges[0].seed: expected an integer >= 0; got True"),
    ({"inputs": []}, "r.yaml: merges[0].inputs: expected a list of adapters"),
    ({"inputs": ["a", {"path": "b", "weight": "heavy"}]}, "r.yaml: merges[0].inputs[1].weight: expected a finite"),
    ({"inputs": ["a", {"path": "b", "size": 1}]}, "r.yaml: merges[0].inputs[1].size: unknown key"),
    ({"inputs": ["a", "nowhere"]}, "r.yaml: merges[0].inputs[1]: local path 'nowhere' does not exist and is not"),
    ({"inputs": ["a", {"path": "b", "revision": "v1"}]}, "r.yaml: merges[0].inputs[1].revision: 'b' is a local"),
    ({"params": {"bogus": 1}}, "r.yaml: merges[0].params: method 'ties' has no parameter 'bogus'"),
    ({"params": {"density": "lots"}}, "r.yaml: merges[0].params: method 'ties' parameter 'density' must be"),
    ({"params": [1, 2]}, "r.yaml: merges[0].params: expected a mapping of parameter names to values"),
    ({"format": "onnx"}, "r.yaml: merges[0].format: expected one of peft, kohya, diffusers, gguf, comfyui; got 'onnx'"),
    ({"dtype": "fp8"}, "r.yaml: merges[0].dtype: expected one of bf16, fp16, fp32; got 'fp8'"),
    ({"target": "vllm", "output": "out.safetensors"}, "r.yaml: merges[0].target: vllm loads peft adapters"),
    ({"device": "tpu"}, "r.yaml: merges[0].device: device must be 'cpu', 'cuda' or 'cuda:N'; got 'tpu'"),
    ({"method": "regmean"}, "r.yaml: merges[0].calibration: method 'regmean' needs calibration data"),
    ({"method": "regmean_pp"}, "r.yaml: merges[0].calibration: method 'regmean_pp' needs calibration data"),
    ({"method": "regmean_pp", "calibration": {"saved": ["a", "b"]}}, "r.yaml: merges[0].calibration: regmean_pp "
                                                                     "takes its Grams on the model"),
    ({"params": {"allocate": "best"}}, "r.yaml: merges[0].params: allocate must be one of"),
    ({"params": {"rank": 2}}, "r.yaml: merges[0].params: the rank is given twice"),
    ({"target": "vllm", "rank": 1000}, "r.yaml: merges[0].target: "),
    ({"calibration": {"model": "m", "prompts": ["p.jsonl"]}}, "r.yaml: merges[0].calibration: got 1 prompts files "
                                                              "for 2 adapters"),
    ({"calibration": {"model": "m", "prompts": "p.jsonl"}}, "r.yaml: merges[0].calibration.prompts: expected a list"),
    ({"calibration": {"modle": "m"}}, "r.yaml: merges[0].calibration.modle: unknown key (expected model, prompts"),
    ({"output": "a"}, "r.yaml: merges[0].inputs[0]: 'a' is this merge's own output"),
    ({"output": "a/sub"}, "r.yaml: merges[0].output: output 'a/sub' lies inside input adapter 'a'"),
    ({"output": "p.jsonl"}, "r.yaml: merges[0].output: output 'p.jsonl' already exists (pass --overwrite"),
])
def test_validation_names_the_key(here, capsys, change, expected):
    code, out, err = run(capsys, "run", write(here / "r.yaml", {"merges": [{**GOOD, **change}]}))
    lines = err.strip().splitlines()
    assert code == 2 and lines and all(line.startswith("error: ") for line in lines), err
    assert any(line.startswith(f"error: {expected}") for line in lines), err
    assert not (here / "out").exists() and out == ""


@pytest.mark.parametrize("text, expected", [
    ("merges: [", "r.yaml: not valid YAML (line"),
    ("- just a list", "r.yaml: expected `merges:` with a list of merges"),
    ("merges: []", "r.yaml: expected `merges:` with a list of merges"),
    ("merges: [3]", "r.yaml: merges[0]: expected a mapping (inputs, output, method, ...); got 3"),
    ("merges: [{output: x}]", "r.yaml: merges[0]: missing key 'inputs'"),
    ("defaults: {output: x}\nmerges: [{inputs: [a], output: y}]", "r.yaml: defaults.output: unknown key"),
    ("merge: [{inputs: [a], output: y}]", "r.yaml: expected `merges:`"),
    ("merges: [{inputs: [a], output: y}]\nextra: 1", "r.yaml: extra: unknown key (expected merges, defaults)"),
    ("merges: [{inputs: [a], output: y}, {inputs: [b], output: y}]", "r.yaml: merges[1].output: 'y' is also the "
                                                                      "output of merges[0]"),
    ("merges: [{inputs: [y], output: z}, {inputs: [b], output: y}]", "r.yaml: merges[0].inputs[0]: written by "
                                                                      "merges[1], which runs later"),
])
def test_file_level_problems(here, capsys, text, expected):
    (here / "r.yaml").write_text(text)
    code, _, err = run(capsys, "run", "r.yaml")
    assert code == 2 and f"error: {expected}" in err, err


def test_every_problem_is_reported_and_nothing_runs(here, capsys):
    recipe = write(here / "r.yaml", {"merges": [{"inputs": ["a", "b"], "output": "first"},
                                                {"inputs": ["a"], "output": "x", "method": "foo"},
                                                {"inputs": ["a", "b"], "output": "y", "rank": -1}]})
    code, out, err = run(capsys, "run", recipe)
    assert code == 2 and out == ""
    assert err.splitlines() == ["error: r.yaml: merges[1].method: unknown merge method 'foo' (available: "
                                + ", ".join(ll.available_methods()) + ")",
                                "error: r.yaml: merges[2].rank: expected an integer >= 1; got -1"]
    assert not (here / "first").exists()


def test_runs_in_order_records_the_recipe_and_prints_it_back(here, capsys):
    recipe = write(here / "r.yaml", {"defaults": {"method": "ties", "rank": 3},
                                     "merges": [GOOD, {"inputs": ["out", "c"], "output": "chained.safetensors",
                                                       "method": "task_arithmetic"}]})
    code, out, err = run(capsys, "run", recipe, "--dry-run")
    assert code == 0 and not (here / "out").exists()
    assert out.splitlines()[1:] == [
        "merges[0]: lora-lego merge a b -o out --weights 1 0.5 --method ties --rank 3 --seed 2 -p density=0.5",
        "merges[1]: lora-lego merge out c -o chained.safetensors --method task_arithmetic --rank 3"]
    code, out, err = run(capsys, "run", recipe)
    assert code == 0, err
    assert "merge: 2 adapter(s) -> out (peft" in out and "run: 2 merge(s) of r.yaml done" in out
    first = ll.load_adapter(here / "out")
    assert first.metadata["provenance"]["recipe"] == {"file": "r.yaml", "key": "merges[0]", "merge": GOOD}
    chained = ll.load_adapter(here / "chained.safetensors")
    assert chained.metadata["provenance"]["recipe"]["merge"]["rank"] == 3  # defaults applied
    code, out, _ = run(capsys, "inspect", "out", "--recipe")
    assert code == 0 and out.startswith("# as recorded from r.yaml, merges[0]\n")
    assert yaml.safe_load(out) == {"merges": [GOOD]}
    assert list(yaml.safe_load(out)["merges"][0]) == ["inputs", "output", "method", "params", "rank", "seed"]
    code, _, err = run(capsys, "run", recipe)
    assert code == 2 and "merges[0].output: output 'out' already exists" in err
    assert run(capsys, "run", recipe, "--overwrite")[0] == 0


def test_a_recipe_rebuilt_from_provenance_makes_the_same_adapter(here, capsys):
    assert main(["merge", "a", "b", "c", "-o", "m", "--method", "lego", "--rank", "3", "--weights", "1", "2", "0.5",
                 "-p", "n_init=2", "--seed", "5", "-q"]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "inspect", "m", "--recipe")
    assert code == 0 and out.startswith("# reconstructed from the provenance of m")
    data = yaml.safe_load(out)
    assert data == {"merges": [{"inputs": ["a", {"path": "b", "weight": 2.0}, {"path": "c", "weight": 0.5}],
                                "output": "m", "method": "lego", "params": {"n_init": 2}, "rank": 3, "seed": 5}]}
    data["merges"][0]["output"] = "again"
    assert run(capsys, "run", write(here / "again.json", data))[0] == 0  # JSON recipes too
    made, again = ll.load_adapter(here / "m"), ll.load_adapter(here / "again")
    assert all(torch.equal(made[m].A, again[m].A) and torch.equal(made[m].B, again[m].B) for m in made)


def test_inspect_recipe_of_an_adapter_not_made_by_lora_lego(here, capsys):
    from conftest import make_peft_adapter

    folder = make_peft_adapter(here, "peft_made")
    code, _, err = run(capsys, "inspect", folder, "--recipe")
    assert code == 2 and "records no lora-lego provenance" in err


def test_jobs_run_side_by_side_and_give_the_same_files(here, capsys):
    merges = [{"inputs": ["a", "b"], "output": f"j{i}", "method": "ties", "rank": 2} for i in range(2)]
    merges.append({"inputs": ["j0", "c"], "output": "j2", "method": "concat"})  # waits for j0
    recipe = write(here / "r.yaml", {"merges": merges})
    code, out, err = run(capsys, "run", recipe, "--jobs", "2")
    assert code == 0, err
    assert {line.split(":")[0] for line in out.splitlines() if line.startswith("merges[")} == {
        "merges[0]", "merges[1]", "merges[2]"}
    made = [ll.load_adapter(here / f"j{i}") for i in range(2)]  # the same merge: the same factors, bitwise
    assert all(torch.equal(made[0][m].A, made[1][m].A) and torch.equal(made[0][m].B, made[1][m].B) for m in made[0])
    assert made[1].metadata["provenance"]["recipe"]["key"] == "merges[1]" and (here / "j2").is_dir()
