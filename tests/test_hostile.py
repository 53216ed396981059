"""Hostile conditions (docs/reliability.md): OS-level failures while writing (full disk, file-size limit,
permissions, read-only file system, interrupted calls), a closed stdout pipe, Ctrl-C during start-up."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError, safe_open

from conftest import file_checksums
from lora_lego.cli import main
from lora_lego.oserrors import os_errno

FAILURES = [(errno.ENOSPC, "No space left on device (free some space"), (errno.EFBIG, "File too large (the file"),
            (errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system"),
            (errno.EINTR, "Interrupted system call"), (errno.EPIPE, "Broken pipe")]


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


def _one_error_line(capsys) -> str:
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("code, phrase", FAILURES, ids=[errno.errorcode[c] for c, _ in FAILURES])
def test_os_failure_writing_a_folder_is_one_line_exit_2(code, phrase, tmp_path, peft_adapter, monkeypatch, capsys):
    a, b = peft_adapter("a"), peft_adapter("b", r=2)
    before = file_checksums(tmp_path)
    monkeypatch.setattr("lora_lego.formats.peft.save_file", _fail_with(code))
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "out"), "--method", "concat", "-q"]) == 2
    line = _one_error_line(capsys)
    assert phrase in line and str(tmp_path / "out") in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]  # no output, no temporary
    assert file_checksums(tmp_path) == before


def test_safetensors_writer_errors_carry_their_errno():  # the Rust writer raises SafetensorError, not OSError
    assert os_errno(SafetensorError("Error while serializing: I/O error: File too large (os error 27)")) == 27
    assert os_errno(SafetensorError("Error while deserializing header: HeaderTooLarge")) is None
    assert os_errno(ValueError("(os error 28)")) is None


@pytest.mark.parametrize("code, phrase", FAILURES[:2], ids=["ENOSPC", "EFBIG"])
def test_os_failure_writing_a_file_is_one_line_exit_2(code, phrase, tmp_path, peft_adapter, monkeypatch, capsys):
    a = peft_adapter("a")
    monkeypatch.setattr("lora_lego.tensorfile.TensorWriter.write", _fail_with(code))
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(a), "-o", str(out), "--format", "diffusers"]) == 2
    assert phrase in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_an_os_failure_elsewhere_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lora_lego.cli.listing.method_specs", _fail_with(errno.EIO))
    assert main(["methods"]) == 2
    assert _one_error_line(capsys) == "error: Input/output error"


def _run_cli(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "lora_lego", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_file_size_limit_is_an_error_not_a_kill(tmp_path, peft_adapter):
    a, b = peft_adapter("a"), peft_adapter("b", r=2)
    out = tmp_path / "out"
    command = (f"ulimit -f 2; exec {sys.executable} -m lora_lego merge {a} {b} -o {out} --method concat -q")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr)  # not killed by SIGXFSZ
    assert done.stderr.strip().splitlines() == [
        (f"error: cannot write output {str(out)!r}: File too large (the file system's or the process's file-size "
         "limit, ulimit -f)")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_a_closed_pipe_is_quiet():  # `lora-lego methods | head -0`: the reader has gone before the output
    process = _run_cli(["methods"])
    process.stdout.close()
    err = process.stderr.read()
    process.wait(timeout=300)
    assert (process.returncode, err) == (141, "")


def test_ctrl_c_while_torch_is_imported_is_one_line_exit_130():
    process = _run_cli(["formats"])  # `formats` imports torch when it runs (`methods` and --help never do)
    maps, deadline = Path(f"/proc/{process.pid}/maps"), time.monotonic() + 120
    while maps.exists() and "libtorch" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.005)  # until torch's library is mapped: the command is importing torch (a second or more)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert (process.returncode, err, out) == (130, "error: interrupted\n", "")


# a merge that, once its output is written in the temporary folder, prints "ready" and waits for a file
WAITING_WRITER = """
import pathlib, sys, time
import lora_lego.formats.peft

real_save_file = lora_lego.formats.peft.save_file

def save_then_wait(tensors, filename, metadata=None):
    real_save_file(tensors, filename, metadata=metadata)
    print("ready", flush=True)
    while not pathlib.Path(sys.argv[1]).exists():
        time.sleep(0.01)

lora_lego.formats.peft.save_file = save_then_wait  # the PEFT writer's tensorfile.save_file
from lora_lego.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _writer(go, args):
    return subprocess.Popen([sys.executable, "-c", WAITING_WRITER, str(go), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_merges_racing_to_one_new_output_exactly_one_wins(tmp_path, peft_adapter):
    a, b = peft_adapter("a"), peft_adapter("b", r=2)
    out, go = tmp_path / "outputs" / "merged", tmp_path / "go"
    racers = [_writer(go, ["merge", str(a), str(b), "-o", str(out), "--method", method, "-q"])
              for method in ("concat", "tsv")]
    try:
        for racer in racers:  # both passed every check and wrote their temporary folder: a real race
            assert racer.stdout.readline().strip() == "ready"
        go.touch()
        results = [(racer.wait(timeout=300), racer.stderr.read()) for racer in racers]
    finally:
        for racer in racers:
            racer.kill()
            racer.stdout.close()
            racer.stderr.close()
    assert sorted(code for code, _ in results) == [0, 2], results
    (loser,) = [err for code, err in results if code == 2]
    assert loser.strip().splitlines() == [(f"error: output {str(out)!r} already exists (written meanwhile by another "
                                           "run? pass --overwrite / overwrite=True to replace it)")]
    winner = ("concat", "tsv")[[code for code, _ in results].index(0)]
    with safe_open(out / "adapter_model.safetensors", "pt") as written:  # the winner's output, not replaced
        assert json.loads(written.metadata()["lora_lego"])["method"] == winner
    assert [p.name for p in out.parent.iterdir()] == ["merged"]  # the loser's temporary is gone


def test_sigterm_while_writing_removes_the_temporary(tmp_path, peft_adapter):
    a = peft_adapter("a")
    out, go = tmp_path / "outputs" / "merged", tmp_path / "never"
    writer = _writer(go, ["merge", str(a), "-o", str(out), "--method", "concat", "-q"])
    try:
        assert writer.stdout.readline().strip() == "ready"
        assert len(list(out.parent.iterdir())) == 1  # the temporary folder
        writer.send_signal(signal.SIGTERM)
        code, err = writer.wait(timeout=300), writer.stderr.read()
    finally:
        writer.kill()
        writer.stdout.close()
        writer.stderr.close()
    assert (code, err) == (143, "error: terminated\n")
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "link-or-mkdir"])
def test_rename_no_replace(tmp_path, monkeypatch, fallback):
    from lora_lego import noreplace

    if fallback:
        monkeypatch.setattr(noreplace, "_renameat2", None)
    source = tmp_path / "s"
    (tmp_path / "file").touch()
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "folder" / "x").mkdir(parents=True)
    (tmp_path / "dangling-link").symlink_to(tmp_path / "nowhere")
    for existing in ("file", "empty-folder", "folder", "dangling-link"):
        target = tmp_path / existing
        for make in (lambda: source.write_text("new"), source.mkdir):
            make()
            with pytest.raises(FileExistsError):
                noreplace.rename_no_replace(source, target)
            assert source.exists()
            (source.rmdir if source.is_dir() else source.unlink)()
    source.write_text("new")
    noreplace.rename_no_replace(source, tmp_path / "fresh")
    assert (tmp_path / "fresh").read_text() == "new" and not source.exists()
    source.mkdir()
    (source / "f").write_text("x")
    noreplace.rename_no_replace(source, tmp_path / "fresh-folder")
    assert (tmp_path / "fresh-folder" / "f").read_text() == "x" and not source.exists()


@pytest.mark.parametrize("name", ["out.safetensors", "out"], ids=["diffusers-file", "peft-folder"])
def test_values_that_overflow_the_output_dtype_are_refused_before_writing(tmp_path, name):
    import torch

    from lora_lego import Adapter, LoraFactors, save_adapter
    from lora_lego.errors import OutputError

    module = "model.layers.0.self_attn.q_proj"
    adapter = Adapter({module: LoraFactors(torch.full((2, 8), 1e5), torch.full((8, 2), 1e-5))}, {}, name="big")
    with pytest.raises(OutputError, match=rf"output '.*{name}', module '{module}': lora_A would hold NaN or Inf in "
                                          r"float16 \(largest \|value\| 1e\+05 does not fit"):
        save_adapter(adapter, tmp_path / name, dtype="fp16")  # finite in float32, above float16's 65504
    assert list(tmp_path.iterdir()) == []
