"""The reliability corpus (docs/reliability.md): every bad input gets one typed error naming the adapter (and
the module where it applies), the CLI exits 2 with one `error: ...` line, nothing is written and the inputs
are left untouched; a merge killed while writing leaves only a temporary folder that the next write removes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import lora_lego as ll
from conftest import LLAMA, edit_config, edit_tensors, file_checksums
from lora_lego.cli import main
from lora_lego.errors import AdapterFormatError, IncompatibleAdaptersError, LoraLegoWarning, MethodError, OutputError

Q0, V0, V1 = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
              "model.layers.1.self_attn.v_proj")


def wide_llama():
    """Another base model: the tiny llama with hidden size 48 instead of 32 (same module names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**{**LLAMA, "hidden_size": 48})).eval()


@dataclass
class Bad:
    """One bad merge: its inputs and options, and the error it must get (type, phrase, names in the message)."""

    adapters: list[Path]
    error: type
    phrase: str
    names: list[str] = field(default_factory=list)  # more that the message must name: modules, keys
    about: str = "adapters"  # the message also names: every input adapter, the "output", or "none" of them
    method: str = "lego"
    params: dict[str, Any] = field(default_factory=dict)
    weights: list[float] | None = None
    output: Path | None = None  # default: tmp_path / "out"
    overwrite: bool = False
    report: Path | None = None  # CLI only
    dtype: str | None = None


def _tensor(key: str, value) -> Callable[[dict], None]:
    return lambda tensors: tensors.update({f"base_model.model.{key}": value})


def _poison(module: str, value: float) -> Callable[[dict], None]:
    def edit(tensors):
        key = f"base_model.model.{module}.lora_A.weight"
        tensors[key] = tensors[key].clone()
        tensors[key][1, 2] = value
    return edit


def _edited(make, name, *, config=None, tensors=None, remove=None, write=None, **kwargs) -> Path:
    """An adapter made by PEFT, then damaged: config keys changed, tensors edited, a file removed or rewritten."""
    folder = make(name, **kwargs)
    if config:
        edit_config(folder, **config)
    if tensors:
        edit_tensors(folder, tensors)
    if remove:
        (folder / remove).unlink()
    if write:
        filename, content = write
        (folder / filename).write_bytes(content(folder / filename))
    return folder


def _read_only_folder(tmp: Path) -> Path:
    folder = tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:  # root (and some file systems) ignore the mode: then this case proves nothing
        (folder / "probe").touch()
    except PermissionError:
        return folder
    (folder / "probe").unlink()
    folder.chmod(0o700)
    pytest.skip("chmod 0o500 does not block writes here (running as root?); see output-under-a-file")


def _ia3(make):
    from peft import IA3Config

    return make("ia3", config_class=IA3Config, target_modules=["k_proj", "v_proj"], feedforward_modules=[])


def _rank_zero(module: str) -> Callable[[dict], None]:
    """lora_A of shape (0, d_in) and lora_B of shape (d_out, 0): rank 0 (d_in = d_out = 32 for q_proj)."""
    def edit(tensors):
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.ones(0, 32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.ones(32, 0)
    return edit


def _existing(path: Path, folder: bool = True) -> Path:
    """An earlier output folder (with a file in it), or a plain file."""
    if folder:
        path.mkdir()
        (path / "keep.txt").write_text("an earlier result")
    else:
        path.write_text("a file")
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _link(path: Path, target: Path) -> Path:
    target.write_text("someone else's file")
    path.symlink_to(target)
    return path


def _duplicated_key(path: Path) -> bytes:
    """The file with its first tensor named twice in the header (same offsets): JSON that a lenient parser reads."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    entries = list(json.loads(data[8:8 + length]).items())
    first = next(item for item in entries if item[0] != "__metadata__")
    header = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in [*entries, first]) + "}").encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + length:]


class _Pickled:  # a pickle that would run code (print) when loaded without weights_only
    def __reduce__(self):
        return (print, ("this ran",))


def _pickled_bin(make) -> Path:
    folder = _edited(make, "a", remove="adapter_model.safetensors")
    torch.save({"x": _Pickled()}, folder / "adapter_model.bin")
    return folder


def _half(path: Path) -> bytes:
    return path.read_bytes()[: path.stat().st_size // 2]


# id -> builder(make, tmp) -> Bad; `make(name, **lora_config)` saves a PEFT adapter under tmp / "inputs"
CASES: dict[str, Callable[[Callable, Path], Bad]] = {
    "missing-folder": lambda make, tmp: Bad([tmp / "nowhere"], AdapterFormatError, "no such folder",
                                            [str(tmp / "nowhere")]),
    "no-config": lambda make, tmp: Bad([_edited(make, "a", remove="adapter_config.json")], AdapterFormatError,
                                       "no adapter_config.json"),
    "invalid-json": lambda make, tmp: Bad([_edited(make, "a", write=("adapter_config.json", lambda p: b"{not"))],
                                          AdapterFormatError, "is not valid JSON"),
    "other-peft-type": lambda make, tmp: Bad([_ia3(make)], AdapterFormatError, "peft_type is 'IA3'"),
    "no-safetensors": lambda make, tmp: Bad([_edited(make, "a", remove="adapter_model.safetensors")],
                                            AdapterFormatError, "no adapter_model.safetensors or adapter_model.bin"),
    "truncated-safetensors": lambda make, tmp: Bad(
        [_edited(make, "a", write=("adapter_model.safetensors", _half))], AdapterFormatError,
        "cannot read adapter_model.safetensors"),
    "duplicated-tensor-name": lambda make, tmp: Bad(
        [_edited(make, "a", write=("adapter_model.safetensors", _duplicated_key))], AdapterFormatError,
        "the header names 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' twice"),
    "pickled-bin": lambda make, tmp: Bad([_pickled_bin(make)], AdapterFormatError, "holds pickled objects other "
                                         "than tensors: Unsupported global: GLOBAL "),
    "not-lora-keys": lambda make, tmp: Bad([_edited(make, "a", tensors=_tensor(f"{Q0}.lora_C.weight", torch.ones(2)))],
                                           AdapterFormatError, "not LoRA factors", [f"{Q0}.lora_C.weight"]),
    "a-b-shape-mismatch": lambda make, tmp: Bad(
        [_edited(make, "a", tensors=_tensor(f"{V1}.lora_B.weight", torch.ones(16, 5)))], AdapterFormatError,
        "expected (r, d_in) and (d_out, r)", [V1]),
    "different-base-models": lambda make, tmp: Bad([make("a"), make("wide", base=wide_llama)],
                                                   IncompatibleAdaptersError, "different base models", [Q0]),
    "fan-in-fan-out-differs": lambda make, tmp: Bad([make("a"), _edited(make, "b", config={"fan_in_fan_out": True})],
                                                    IncompatibleAdaptersError, "fan_in_fan_out"),
    "nan-tensor": lambda make, tmp: Bad([_edited(make, "a", tensors=_poison(V0, float("nan")))],
                                        AdapterFormatError, "lora_A contains NaN or Inf", [V0]),
    "inf-tensor": lambda make, tmp: Bad([_edited(make, "a", tensors=_poison(V0, float("inf")))],
                                        AdapterFormatError, "lora_A contains NaN or Inf", [V0]),
    "overflowing-alpha": lambda make, tmp: Bad([_edited(make, "a", config={"lora_alpha": 1e300})],
                                               AdapterFormatError, "NaN or Inf", [Q0, "scaling 2.5e+299"]),
    "alpha-pattern-not-a-number": lambda make, tmp: Bad(
        [_edited(make, "a", config={"alpha_pattern": {"q_proj": "x"}})], AdapterFormatError,
        "alpha_pattern['q_proj'] must be a number"),
    "pattern-costly": lambda make, tmp: Bad(
        [_edited(make, "a", config={"rank_pattern": {"(x{100}){100}": 2}})], AdapterFormatError,
        "rank_pattern key '(x{100}){100}' expands to more than"),
    "pattern-backreference": lambda make, tmp: Bad([_edited(make, "a", config={"alpha_pattern": {r"(q)\1": 2}})],
                                                   AdapterFormatError, "uses a backreference"),
    "zero-rank-tensors": lambda make, tmp: Bad([_edited(make, "a", tensors=_rank_zero(Q0))], AdapterFormatError,
                                               "rank 0", [Q0]),
    "zero-rank-config": lambda make, tmp: Bad([_edited(make, "a", config={"r": 0})], AdapterFormatError,
                                              "config says r=0", [Q0]),
    "k-below-1": lambda make, tmp: Bad([make("a"), make("b")], MethodError, "must be an integer >= 1", [Q0],
                                       params={"rank": 0}),
    "k-not-an-integer": lambda make, tmp: Bad([make("a")], MethodError, "must be an integer", params={"rank": "1.5"},
                                              about="none"),
    "weights-wrong-length": lambda make, tmp: Bad([make("a"), make("b")], MethodError, "1 weights for 2 adapters",
                                                  weights=[1.0]),
    "weight-nan": lambda make, tmp: Bad([make("a"), make("b")], MethodError, "weight nan is not a finite number",
                                        [str(tmp / "inputs" / "b")], weights=[1.0, float("nan")], about="none"),
    "weight-inf": lambda make, tmp: Bad([make("a"), make("b")], MethodError, "weight inf is not a finite number",
                                        [str(tmp / "inputs" / "a")], weights=[float("inf"), 1.0], about="none"),
    "weights-all-zero": lambda make, tmp: Bad([make("a"), make("b")], MethodError, "all weights are zero",
                                              weights=[0.0, 0.0]),
    "unknown-method": lambda make, tmp: Bad([make("a")], MethodError, "unknown merge method 'nope'", method="nope",
                                            about="none"),
    "unknown-parameter": lambda make, tmp: Bad([make("a")], MethodError, "no parameter 'bogus'",
                                               params={"bogus": "1"}, about="none"),
    "ill-typed-parameter": lambda make, tmp: Bad([make("a")], MethodError, "'n_init' must be an integer",
                                                 params={"n_init": "x"}, about="none"),
    "int-parameter-overflows": lambda make, tmp: Bad([make("a")], MethodError, "'n_init' must be an integer of "
                                                     "magnitude at most 2147483647", params={"n_init": "9" * 23},
                                                     about="none"),
    "float-parameter-overflows": lambda make, tmp: Bad([make("a")], MethodError, "'tol' must be a finite number",
                                                       params={"tol": "1e400"}, about="none"),
    "dora": lambda make, tmp: Bad([make("dora", use_dora=True)], AdapterFormatError, "DoRA"),
    "lora-bias": lambda make, tmp: Bad([make("bias", lora_bias=True)], AdapterFormatError, "lora_bias"),
    "output-exists": lambda make, tmp: Bad([make("a")], OutputError, "already exists", output=_existing(tmp / "out"),
                                           about="output"),
    "output-inside-input": lambda make, tmp: Bad([make("a")], OutputError, "lies inside input adapter",
                                                 output=tmp / "inputs" / "a" / "merged"),
    "output-contains-input": lambda make, tmp: Bad([make("a")], OutputError, "contains input adapter",
                                                   output=tmp / "inputs", overwrite=True),
    "output-under-a-file": lambda make, tmp: Bad([make("a")], OutputError, "is not a folder",
                                                 output=_existing(tmp / "file.txt", folder=False) / "out",
                                                 about="output"),
    "output-in-read-only-folder": lambda make, tmp: Bad([make("a")], OutputError, "is not writable",
                                                        output=_read_only_folder(tmp) / "out", about="output"),
    "fp16-overflow": lambda make, tmp: Bad([_edited(make, "a", tensors=_poison(V0, 1e5))], OutputError,
                                           "lora_A would hold NaN or Inf in float16", [V0], method="concat",
                                           dtype="fp16", about="output"),
    "output-dot": lambda make, tmp: Bad([make("a")], OutputError, "names a current or parent folder",
                                        output=Path("."), about="output"),
    "output-fifo": lambda make, tmp: Bad([make("a")], OutputError, "is a fifo; expected a regular file or folder",
                                         output=_fifo(tmp / "fifo"), overwrite=True, about="output"),
    "report-exists": lambda make, tmp: Bad([make("a")], OutputError, "already exists (pass --overwrite",
                                           report=_existing(tmp / "report.json", folder=False), about="none"),
    "report-symlink": lambda make, tmp: Bad([make("a")], OutputError, "is a symbolic link", overwrite=True,
                                            report=_link(tmp / "report.json", tmp / "elsewhere.json"), about="none"),
    "report-inside-input": lambda make, tmp: Bad([make("a")], OutputError, "lies inside input adapter",
                                                 report=tmp / "inputs" / "a" / "report.json"),
}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` -> sha256 of its content ("dir" for folders): proves nothing was written."""
    folders = {str(p.relative_to(root)): "dir" for p in root.rglob("*") if p.is_dir()}
    return {**folders, **file_checksums(root)}


def cli_argv(bad: Bad, output: Path) -> list[str]:
    argv = ["merge", *map(str, bad.adapters), "-o", str(output), "--method", bad.method, "-q"]
    for key, value in bad.params.items():
        argv += ["--rank", str(value)] if key == "rank" and isinstance(value, int) else ["-p", f"{key}={value}"]
    if bad.weights is not None:
        argv += ["--weights", *map(str, bad.weights)]
    if bad.overwrite:
        argv.append("--overwrite")
    if bad.report is not None:
        argv += ["--report", str(bad.report)]
    if bad.dtype is not None:
        argv += ["--dtype", bad.dtype]
    return argv


def api_merge(bad: Bad, output: Path) -> None:
    """The same merge through the Python API: load, merge, save."""
    adapters = [ll.load_adapter(path) for path in bad.adapters]
    merged = ll.merge(adapters, bad.method, weights=bad.weights, seed=0, **bad.params)
    ll.save_adapter(merged, output, overwrite=bad.overwrite, dtype=bad.dtype)


def assert_names(message: str, bad: Bad, output: Path) -> None:
    """The message holds the case's phrase, its names, and every input adapter or the output path."""
    named = {"adapters": [str(path) for path in bad.adapters], "output": [str(output)], "none": []}[bad.about]
    for text in (bad.phrase, *bad.names, *named):
        assert text in message, (text, message)


@pytest.mark.parametrize("build", CASES.values(), ids=CASES.keys())
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(build, tmp_path, peft_adapter, capsys):
    bad = build(peft_adapter, tmp_path)
    output = bad.output or tmp_path / "out"
    before = snapshot(tmp_path)
    code = main(cli_argv(bad, output))
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err
    assert_names(lines[0], bad, output)
    assert "weights_only" not in lines[0]  # never pass on torch's advice to unpickle an untrusted file
    assert snapshot(tmp_path) == before  # no output, no temporary, inputs untouched

    assert main(["--debug", *cli_argv(bad, output)]) == 2
    _, err = capsys.readouterr()
    assert "Traceback" in err and err.strip().splitlines()[-1] == lines[0]
    assert snapshot(tmp_path) == before


API_CASES = {key: build for key, build in CASES.items() if not key.startswith("report-")}  # --report is CLI only


@pytest.mark.parametrize("build", API_CASES.values(), ids=API_CASES.keys())
def test_api_bad_input_raises_the_typed_error(build, tmp_path, peft_adapter):
    bad = build(peft_adapter, tmp_path)
    output = bad.output or tmp_path / "out"
    before = snapshot(tmp_path)
    with warnings.catch_warnings(), pytest.raises(bad.error) as caught:
        warnings.simplefilter("ignore", LoraLegoWarning)
        api_merge(bad, output)
    assert type(caught.value) is bad.error
    assert_names(str(caught.value), bad, output)
    assert snapshot(tmp_path) == before


def test_no_module_in_common_is_a_warning_and_a_union(tmp_path, peft_adapter, capsys):
    q, v = peft_adapter("q", target_modules=["q_proj"]), peft_adapter("v", target_modules=["v_proj"])
    before = snapshot(tmp_path / "inputs")
    code = main(["merge", str(q), str(v), "-o", str(tmp_path / "out"), "--method", "concat", "-q"])
    out, err = capsys.readouterr()
    warning_lines = err.strip().splitlines()
    assert code == 0 and len(warning_lines) == 2, err  # one warning per adapter
    assert all(line.startswith("warning: ") and "no module in common" in line for line in warning_lines)
    assert str(q) in warning_lines[0] and str(v) in warning_lines[1] and "-> " in out
    with pytest.warns(LoraLegoWarning, match="no module in common"):
        merged = ll.merge([ll.load_adapter(q), ll.load_adapter(v)], "lego")
    assert set(merged) == set(ll.load_adapter(tmp_path / "out")) == {Q0, V0, "model.layers.1.self_attn.q_proj", V1}
    assert snapshot(tmp_path / "inputs") == before


KILLED_WRITER = """
import sys, time
import lora_lego.formats.peft

real_save_file = lora_lego.formats.peft.save_file

def half_then_hang(tensors, filename, metadata=None):  # a half-written file, then the process hangs
    real_save_file(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as stream:
        stream.truncate(stream.seek(0, 2) // 2)
    print("writing", flush=True)
    time.sleep(600)

lora_lego.formats.peft.save_file = half_then_hang  # the PEFT writer's tensorfile.save_file
from lora_lego.cli import main
main(sys.argv[1:])
"""


def test_kill_during_writing_leaves_only_a_temporary_that_the_next_write_removes(tmp_path, peft_adapter):
    a, b = peft_adapter("a"), peft_adapter("b", r=2)
    before = snapshot(tmp_path / "inputs")
    out = tmp_path / "outputs" / "merged"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, "merge", str(a), str(b), "-o", str(out),
                               "--method", "concat", "-q"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"  # inside save_file, in the temporary folder
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    finally:
        writer.kill()
        writer.stdout.close()
    assert writer.returncode == -signal.SIGKILL
    assert not out.exists()
    (temporary,) = out.parent.iterdir()
    assert temporary.name.startswith(f".merged.tmp-{writer.pid}-")
    assert (temporary / "adapter_model.safetensors").is_file()  # the half-written file
    assert snapshot(tmp_path / "inputs") == before

    merged = ll.merge([ll.load_adapter(a), ll.load_adapter(b)], "concat")
    ll.save_adapter(merged, out)  # the writer is dead: its temporary is stale and goes
    assert [p.name for p in out.parent.iterdir()] == ["merged"]
    assert set(ll.load_adapter(out)) == set(merged)
    assert snapshot(tmp_path / "inputs") == before


def test_output_names_with_glob_characters(tmp_path, peft_adapter):
    adapter = ll.load_adapter(peft_adapter("a"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = tmp_path / f".out[1].tmp-{dead.stdout.strip()}-x"  # a name glob would read as a character class
    stale.mkdir()
    ll.save_adapter(adapter, tmp_path / "out[1]")
    assert not stale.exists() and ll.load_adapter(tmp_path / "out[1]").ranks == adapter.ranks


def test_lego_rank1_checks_its_kmeans_parameters(peft_adapter):
    with pytest.raises(MethodError, match="n_init"):
        ll.merge([ll.load_adapter(peft_adapter("a"))], "lego_rank1", rank=2, n_init=0)


def test_outputs_get_the_usual_permissions_not_mkdtemps_private_ones(tmp_path, peft_adapter):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        ll.save_adapter(ll.load_adapter(peft_adapter("a")), tmp_path / "out")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
