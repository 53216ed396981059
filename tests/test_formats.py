"""The format registry and the CLI over it: detection by tensor names, output formats, mixed-format
merges, convert's check, families, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lora_lego as ll
from lora_lego.cli import main
from lora_lego.formats import convert_adapter, detect_format, output_format
from lora_lego.lowrank import relative_error
from lora_lego.types import Adapter, LoraFactors

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # SD 1.x and SDXL both have it
CONV = "down_blocks.0.resnets.0.conv1"


def _factors(generator: torch.Generator, d_out: int, d_in: int, r: int, kind: str = "linear") -> LoraFactors:
    return LoraFactors(torch.randn(r, d_in, generator=generator), torch.randn(d_out, r, generator=generator), kind)


def _sd_adapter(seed: int, family: str = "sd1") -> Adapter:
    """A small SD-UNet-shaped adapter in diffusers naming (one attention projection, one 3x3 conv)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {f"unet.{TO_Q}": _factors(generator, 8, 8, 2), f"unet.{CONV}": _factors(generator, 4, 36, 3, "conv3x3")}
    return Adapter(modules, {"format": "diffusers", "family": family}, name=f"sd{seed}")


def _deltas_equal(left: Adapter, right: Adapter, tolerance: float = 1e-6) -> None:
    assert set(left) == set(right)
    for module in left:
        assert left[module].kind == right[module].kind
        assert relative_error(right[module], left[module]) <= tolerance, module


def test_detection_by_tensor_names(tmp_path):
    save_file({"lora_unet_x_to_q.lora_down.weight": torch.zeros(2, 4)}, tmp_path / "k.safetensors")
    save_file({"unet.x.to_q.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "d.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "unet.y.lora_A.weight": torch.zeros(2, 4)},
              tmp_path / "mixed.safetensors")
    save_file({"model.embed_tokens.weight": torch.zeros(2, 4)}, tmp_path / "plain.safetensors")
    (tmp_path / "named.bin").write_bytes((tmp_path / "k.safetensors").read_bytes())  # the extension does not matter
    assert detect_format(tmp_path / "k.safetensors") == "kohya"
    assert detect_format(tmp_path / "named.bin") == "kohya"
    assert detect_format(tmp_path / "d.safetensors") == "diffusers"
    assert detect_format(EXAMPLES / "rt_polarity") == "peft"
    with pytest.raises(ll.AdapterFormatError,
                       match=r"mix formats: kohya \(1 keys, e.g. 'lora_unet_x.lora_down.weight'\); diffusers \(1 keys"):
        detect_format(tmp_path / "mixed.safetensors")
    with pytest.raises(ll.AdapterFormatError,
                       match=r"plain.safetensors.*'model.embed_tokens.weight' is not a LoRA key"):
        detect_format(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ll.AdapterFormatError, match="junk.safetensors.*not a readable safetensors file"):
        ll.load_adapter(tmp_path / "junk.safetensors")


def test_output_format_rules():
    peft = ll.load_adapter(EXAMPLES / "rt_polarity", lazy=True)
    assert output_format("out", peft) == "peft"
    assert output_format("out.safetensors", peft) == "diffusers"  # an LLM adapter: PEFT keys in one file
    assert output_format("out.safetensors", _sd_adapter(0)) == "diffusers"
    kohya = convert_adapter(_sd_adapter(0), "kohya")
    assert output_format("out.safetensors", kohya) == "kohya"
    assert output_format("out.safetensors", kohya, "diffusers") == "diffusers"
    with pytest.raises(ll.AdapterFormatError, match="unknown format 'gguf2'"):
        output_format("out.safetensors", kohya, "gguf2")


@pytest.mark.parametrize("target", ["kohya", "diffusers"])
def test_save_and_load_each_file_format(tmp_path, target):
    adapter = _sd_adapter(1)
    path = ll.save_adapter(adapter, tmp_path / "a.safetensors", format=target)
    back = ll.load_adapter(path)
    assert back.metadata["format"] == target and back.metadata["family"] == "sd1"
    _deltas_equal(adapter, convert_adapter(back, "diffusers"))
    assert detect_format(path) == target


def test_merge_refuses_mixed_families_and_namings():
    with pytest.raises(ll.IncompatibleAdaptersError,
                       match=r"different base-model families \('sd0': sd1, 'sd1': sdxl\)"):
        ll.merge([_sd_adapter(0), _sd_adapter(1, "sdxl")], "concat")
    with pytest.raises(ll.IncompatibleAdaptersError, match="name their modules differently"):
        ll.merge([_sd_adapter(0), convert_adapter(_sd_adapter(1), "kohya")], "concat")


def test_cli_merges_a_kohya_file_with_a_diffusers_file_exactly(tmp_path):
    left, right = _sd_adapter(2), _sd_adapter(3)
    ll.save_adapter(left, tmp_path / "left.safetensors", format="kohya")
    ll.save_adapter(right, tmp_path / "right.safetensors", format="diffusers")
    out = tmp_path / "merged.safetensors"
    code = main(["merge", str(tmp_path / "left.safetensors"), str(tmp_path / "right.safetensors"), "--method", "concat",
                 "-o", str(out), "-q"])
    assert code == 0 and detect_format(out) == "kohya"  # the first input's file format
    merged = convert_adapter(ll.load_adapter(out), "diffusers")
    expected = ll.merge([left, right], "concat")
    _deltas_equal(expected, merged, 1e-5)


def test_cli_convert_peft_to_file_and_back(tmp_path, capsys):
    single = tmp_path / "rt.safetensors"
    assert main(["convert", str(EXAMPLES / "rt_polarity"), "-o", str(single)]) == 0
    assert "every delta checked" in capsys.readouterr().out
    folder = tmp_path / "rt_peft"
    assert main(["convert", str(single), "-o", str(folder)]) == 0
    _deltas_equal(ll.load_adapter(EXAMPLES / "rt_polarity"), ll.load_adapter(folder))
    assert main(["convert", str(single), "-o", str(tmp_path / "half.safetensors"), "--dtype", "bf16"]) == 0


def test_cli_one_line_errors(tmp_path, capsys):
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "unet.y.lora_A.weight": torch.zeros(2, 4)},
              tmp_path / "mixed.safetensors")
    assert main(["merge", str(tmp_path / "mixed.safetensors"), str(EXAMPLES / "rt_polarity"), "-o",
                 str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "mix formats" in error and "mixed.safetensors" in error
    assert not (tmp_path / "out").exists()
    args = ["convert", str(EXAMPLES / "rt_polarity"), "-o", str(tmp_path / "x.safetensors"), "--format", "nope"]
    assert main(args) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    ll.save_adapter(_sd_adapter(0), tmp_path / "sd1.safetensors", format="kohya")
    ll.save_adapter(_sd_adapter(1, "sdxl"), tmp_path / "sdxl.safetensors", format="kohya")
    assert main(["merge", str(tmp_path / "sd1.safetensors"), str(tmp_path / "sdxl.safetensors"), "-o",
                 str(tmp_path / "m.safetensors")]) == 2
    error = capsys.readouterr().err
    assert "sd1" in error and "sdxl" in error and error.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.safetensors", "sd1.safetensors", "sdxl.safetensors"]


def test_the_summary_names_what_loads_the_output(tmp_path, capsys):
    llm = str(EXAMPLES / "rt_polarity")
    assert main(["convert", llm, "-o", str(tmp_path / "x.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(diffusers; loads in diffusers' load_lora_weights): every delta checked" in lines[0]
    assert lines[1] == ("note: this is an LLM adapter in a single diffusers file; PEFT (PeftModel.from_pretrained) "
                        f"and vLLM load LLM adapters as a folder: write -o {tmp_path / 'x'} instead")
    assert main(["merge", llm, llm, "-o", str(tmp_path / "m"), "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(peft; loads in PEFT's PeftModel.from_pretrained, vLLM, lora-lego apply) with ties" in lines[0]
    assert not any(line.startswith("note: this is an LLM adapter") for line in lines)
    ll.save_adapter(_sd_adapter(0), tmp_path / "sd.safetensors", format="kohya")
    assert main(["prune", str(tmp_path / "sd.safetensors"), "--rank", "1", "-o", str(tmp_path / "p.safetensors"),
                 "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(kohya; loads in sd-scripts, ComfyUI, A1111 / Forge, diffusers' load_lora_weights)" in lines[0]
    assert len(lines) == 1  # a diffusion-model file: no folder note
    assert main(["convert", str(tmp_path / "sd.safetensors"), "-o", str(tmp_path / "d.safetensors"),
                 "--format", "diffusers"]) == 0
    assert "note:" not in capsys.readouterr().out


@pytest.mark.parametrize("command", ["merge", "convert"])
@pytest.mark.parametrize("name, fmt, message", [
    ("m.gguf", "diffusers", ("output '{out}': format diffusers writes a single .safetensors file, not .gguf; "
                             "name it '{stem}.safetensors'")),
    ("m.safetensors", "gguf", "format gguf writes a single .gguf file, not .safetensors; name it '{stem}.gguf'"),
    ("m.safetensors", "peft", "format peft writes a folder, not a .safetensors file; name it '{stem}'"),
    ("m", "kohya", "format kohya writes a single .safetensors file, not a folder; name it '{stem}.safetensors'"),
    ("m.bin", None, ("output '{out}': no format writes .bin files; name a folder (peft), a .safetensors file "
                     "(kohya, diffusers) or a .gguf file (gguf)")),
    ("m.pt", "peft", "no format writes .pt files"),
])
def test_an_output_name_the_format_does_not_write_is_refused_before_any_work(tmp_path, capsys, command, name, fmt,
                                                                               message):
    out = tmp_path / name
    argv = [command, str(EXAMPLES / "rt_polarity"), "-o", str(out), *(["--format", fmt] if fmt else [])]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ")
    assert message.format(out=out, stem=tmp_path / "m") in error
    assert not list(tmp_path.iterdir())
    with pytest.raises(ll.OutputError, match="does not write|no format writes|writes a"):
        ll.save_adapter(ll.load_adapter(EXAMPLES / "rt_polarity"), out, format=fmt)


def test_inspect_shows_format_family_components(tmp_path, capsys):
    ll.save_adapter(_sd_adapter(0), tmp_path / "a.safetensors", format="kohya")
    assert main(["inspect", str(tmp_path / "a.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "format: kohya" in out and "family: sd1" in out and "components: unet: 2" in out
    assert "conv3x3: 1" in out and "linear: 1" in out and "conv1: 1, to_q: 1" in out
    assert "ss_network_dim=2" in out and "sshs_model_hash=" in out


@pytest.mark.parametrize("method", [m for m in ll.available_methods() if not ll.get_method(m).needs_calibration])
def test_every_data_free_method_merges_kohya_files(tmp_path, method):
    for seed in (4, 5):
        ll.save_adapter(_sd_adapter(seed), tmp_path / f"{seed}.safetensors", format="kohya")
    out = tmp_path / "merged.safetensors"
    args = ["merge", str(tmp_path / "4.safetensors"), str(tmp_path / "5.safetensors"), "--method", method,
            "-o", str(out), "-q"]
    assert main(args) == 0
    merged = ll.load_adapter(out)
    assert merged.metadata["format"] == "kohya" and merged.metadata["family"] == "sd1"
    assert {merged.info(m).kind for m in merged} == {"linear", "conv3x3"}
