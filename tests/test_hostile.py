"""Hostile conditions (docs/reliability.md): OS-level failures while writing (full disk, file-size limit,
permissions, read-only file system, interrupted calls), a closed stdout pipe, Ctrl-C during start-up."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors import SafetensorError

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
    monkeypatch.setattr("lora_lego.cli.available_methods", _fail_with(errno.EIO))
    assert main(["methods"]) == 2
    assert _one_error_line(capsys) == "error: Input/output error"


def _run_cli(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "lora_lego", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_file_size_limit_is_an_error_not_a_kill(tmp_path, peft_adapter):
    a, b = peft_adapter("a"), peft_adapter("b", r=2)
    out = tmp_path / "out"
    command = (f"ulimit -f 2; exec {sys.executable} -m lora_lego merge {a} {b} -o {out} --method concat -q")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr)  # not killed by SIGXFSZ
    assert done.stderr.strip().splitlines() == [
        f"error: cannot write output {str(out)!r}: File too large (the file system's or the process's file-size "
        "limit, ulimit -f)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_a_closed_pipe_is_quiet():  # `lora-lego methods | head -0`: the reader has gone before the output
    process = _run_cli(["methods"])
    process.stdout.close()
    err = process.stderr.read()
    process.wait(timeout=300)
    assert (process.returncode, err) == (141, "")


def test_ctrl_c_during_start_up_is_one_line_exit_130():
    process = _run_cli(["methods"])
    time.sleep(0.5)  # the interpreter is up and lora_lego is importing torch (seconds)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert (process.returncode, err, out) == (130, "error: interrupted\n", "")
