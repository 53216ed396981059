"""ComfyUI's own LoRA files (LoraSave: diffusion_model.<module>.lora_down / lora_up, fp16, no alpha): read, written,
merged, and refused where they cannot go. The format is one file (formats/comfyui.py) plus its registration."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lora_lego as ll
from lora_lego.cli import main
from lora_lego.formats import available_formats, convert_adapter, detect_format
from lora_lego.tensorfile import read_header

ATTN = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
CONV = "diffusion_model.input_blocks.1.0.in_layers.2"
OUT = "diffusion_model.out.2"


def comfy_file(path, seed: int, *, alpha: float | None = None, extra: dict | None = None):
    """What LoraSave writes (fp16, no alpha): a linear module, a 3x3 conv and a 1x1 conv; `alpha` on the first."""
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{ATTN}.lora_down.weight": torch.randn(4, 16, generator=g).half(),
               f"{ATTN}.lora_up.weight": torch.randn(16, 4, generator=g).half(),
               f"{CONV}.lora_down.weight": torch.randn(2, 8, 3, 3, generator=g).half(),
               f"{CONV}.lora_up.weight": torch.randn(8, 2, 1, 1, generator=g).half(),
               f"{OUT}.lora_down.weight": torch.randn(3, 8, 1, 1, generator=g).half(),
               f"{OUT}.lora_up.weight": torch.randn(4, 3, 1, 1, generator=g).half(), **(extra or {})}
    if alpha is not None:
        tensors[f"{ATTN}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path)
    return path, tensors


def test_read_gives_each_module_its_delta(tmp_path):
    path, tensors = comfy_file(tmp_path / "a.safetensors", 0, alpha=2.0)
    assert "comfyui" in available_formats() and detect_format(path) == "comfyui"  # its .alpha is diffusers' key too
    adapter = ll.load_adapter(path)
    assert adapter.metadata["format"] == "comfyui" and adapter.metadata["dtype"] == "float16"
    assert {m: adapter.info(m).kind for m in adapter} == {ATTN: "linear", CONV: "conv3x3", OUT: "conv1x1"}
    for module, scale in ((ATTN, 2.0 / 4), (CONV, 1.0), (OUT, 1.0)):
        down, up = tensors[f"{module}.lora_down.weight"].float(), tensors[f"{module}.lora_up.weight"].float()
        expected = scale * up.flatten(1) @ down.flatten(1)
        assert torch.allclose(adapter[module].delta(), expected, atol=1e-5), module
    lazy = ll.load_adapter(path, lazy=True)
    assert all(torch.equal(lazy[m].A, adapter[m].A) for m in adapter)


def test_write_is_the_loraSave_layout_and_round_trips(tmp_path):
    path, _ = comfy_file(tmp_path / "a.safetensors", 1, alpha=8.0)
    adapter = ll.load_adapter(path)
    out = ll.save_adapter(adapter, tmp_path / "out.safetensors")  # a .safetensors of a ComfyUI adapter: comfyui
    infos, header = read_header(out)
    assert set(infos) == {f"{m}.{s}" for m in adapter for s in ("lora_down.weight", "lora_up.weight")}  # no alpha
    assert infos[f"{CONV}.lora_down.weight"].shape == (2, 8, 3, 3)
    assert infos[f"{ATTN}.lora_up.weight"].dtype == torch.float16  # LoraSave's fp16, kept from the input
    assert header == {}
    with safe_open(out, "pt") as handle:  # the safetensors library reads it
        assert handle.get_tensor(f"{OUT}.lora_up.weight").shape == (4, 3, 1, 1)
    back = ll.load_adapter(out)
    for module in adapter:
        assert torch.allclose(back[module].delta(), adapter[module].delta(), rtol=1e-2, atol=1e-2)
    again = ll.save_adapter(adapter, tmp_path / "again.safetensors")
    assert again.read_bytes() == out.read_bytes()


def test_cli_merges_two_comfy_files_exactly(tmp_path):
    a, _ = comfy_file(tmp_path / "a.safetensors", 2)
    b, _ = comfy_file(tmp_path / "b.safetensors", 3)
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(a), str(b), "--method", "concat", "--dtype", "fp32", "-o", str(out), "-q"]) == 0
    assert detect_format(out) == "comfyui"
    merged, left, right = ll.load_adapter(out), ll.load_adapter(a), ll.load_adapter(b)
    for module in merged:
        assert torch.allclose(merged[module].delta(), left[module].delta() + right[module].delta(), atol=1e-5)
    assert "lora_lego" in read_header(out)[1]


def test_what_comfy_files_cannot_do_is_refused_in_one_line(tmp_path):
    full, _ = comfy_file(tmp_path / "full.safetensors", 4, extra={"diffusion_model.out.2.diff_b": torch.ones(4)})
    with pytest.raises(ll.AdapterFormatError, match="full weight differences"):
        ll.load_adapter(full)
    path, _ = comfy_file(tmp_path / "a.safetensors", 5)
    adapter = ll.load_adapter(path)
    assert adapter.metadata["family"] is None  # blocks SD 1.x and SDXL share, no cross-attention: no family
    kohya = convert_adapter(ll.Adapter({"unet.down_blocks.0.attn1.to_q": adapter[ATTN]},
                                       {"format": "diffusers", "family": "sd1"}), "kohya")
    with pytest.raises(ll.IncompatibleAdaptersError, match="name their modules differently"):
        ll.merge([adapter, kohya], "concat")  # the library merges one naming; harmonise (the CLI) translates
    with pytest.raises(ll.AdapterFormatError, match=r"a\.safetensors', module '.+': its adapter's module names do not say which base model"):
        convert_adapter(adapter, "kohya")
    with pytest.raises(ll.AdapterFormatError, match="'lora_unet_down_blocks_0_attn1_to_q': is an sd1 UNet module"):
        ll.save_adapter(kohya, tmp_path / "k.safetensors", format="comfyui")
    with pytest.raises(ll.AdapterFormatError, match="not ComfyUI module paths"):
        ll.save_adapter(ll.Adapter({"to_q": adapter[ATTN]}, {"format": "comfyui"}), tmp_path / "q.safetensors")
    with pytest.raises(ll.AdapterFormatError, match="comfyui module names"):
        ll.apply_adapter(adapter, tmp_path, tmp_path / "applied")
