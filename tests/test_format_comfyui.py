"""ComfyUI's own LoRA files (LoraSave: diffusion_model.<module>.lora_down / lora_up, fp16, no alpha): read, written,
merged, translated to kohya / diffusers names (SD 1.x / 2.x, SDXL, Flux) and refused where they cannot go. The format is
formats/comfyui.py, its naming formats/names_comfyui.py, plus their registration.

Fixtures are built here. The ComfyUI key layout is LoraSave's (comfy_extras/nodes_lora_extract.py: the model's
state-dict key "diffusion_model.<path>.weight" becomes "diffusion_model.<path>.lora_up.weight" / ".lora_down.weight",
fp16, no alpha); the kohya twin of a module is "lora_unet_<path with _>", the name ComfyUI's loader
(comfy/lora.py, model_lora_keys_unet) maps onto that same key, and the one sd-scripts writes for SDXL (SAI / LDM
paths) and Flux (BFL paths); SD 1.x / 2.x kohya files name the same modules by their diffusers paths (KOHYA, written
out by hand). The module paths themselves are checked against diffusers' LDM and BFL converters.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_lego as ll
from conftest import run_cli
from lora_lego.cli import main
from lora_lego.formats import available_formats, convert_adapter, detect_format
from lora_lego.formats.names_comfyui import family
from lora_lego.tensorfile import read_header
from lora_lego.types import LoraFactors, ModuleInfo

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
    with pytest.raises(ll.AdapterFormatError, match=r"a\.safetensors', module '.+': its adapter's module names do"):
        convert_adapter(adapter, "kohya")
    with pytest.raises(ll.AdapterFormatError, match="'lora_unet_down_blocks_0_attn1_to_q': has no ComfyUI name; "
                       "expected a Linear / Conv2d of the SD 1.x UNet"):
        ll.save_adapter(kohya, tmp_path / "k.safetensors", format="comfyui")
    with pytest.raises(ll.AdapterFormatError, match="not ComfyUI module paths"):
        ll.save_adapter(ll.Adapter({"to_q": adapter[ATTN]}, {"format": "comfyui"}), tmp_path / "q.safetensors")
    with pytest.raises(ll.AdapterFormatError, match="comfyui module names"):
        ll.apply_adapter(adapter, tmp_path, tmp_path / "applied")


# ---------------------------------------------------------------- translation to kohya / diffusers names

# SD 1.x: LDM path -> ((d_out, d_in, kernel), the kohya body sd-scripts writes: the module's diffusers path with "_")
_SD1 = {
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k": ((320, 768, 1),
                                                         "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"),
    "input_blocks.1.1.proj_in": ((320, 320, 1), "down_blocks_0_attentions_0_proj_in"),
    "input_blocks.3.0.op": ((320, 320, 3), "down_blocks_0_downsamplers_0_conv"),
    "input_blocks.10.0.emb_layers.1": ((1280, 1280, 1), "down_blocks_3_resnets_0_time_emb_proj"),
    "middle_block.2.out_layers.3": ((1280, 1280, 3), "mid_block_resnets_1_conv2"),
    "output_blocks.2.1.conv": ((1280, 1280, 3), "up_blocks_0_upsamplers_0_conv"),  # no attention at that level
    "output_blocks.3.0.skip_connection": ((1280, 2560, 1), "up_blocks_1_resnets_0_conv_shortcut"),
    "output_blocks.5.2.conv": ((1280, 1280, 3), "up_blocks_1_upsamplers_0_conv"),
    "output_blocks.11.1.transformer_blocks.0.ff.net.2": ((320, 1280, 1),
                                                         "up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2"),
    "time_embed.0": ((1280, 320, 1), "time_embedding_linear_1"),
    "out.2": ((4, 320, 3), "conv_out"),
}
SD1 = {path: shape for path, (shape, _) in _SD1.items()}
# LDM / BFL paths -> (d_out, d_in, kernel) of real SD 1.x / 2.x / SDXL / Flux layers (Flux's kept tiny: its names say
# the family)
MODULES = {
    "sdxl": {"input_blocks.4.1.transformer_blocks.1.attn2.to_k": (640, 2048, 1),
             "input_blocks.4.1.proj_in": (640, 640, 1), "middle_block.0.in_layers.2": (1280, 1280, 3),
             "output_blocks.2.2.conv": (1280, 1280, 3), "label_emb.0.0": (1280, 2816, 1)},
    "flux": {"double_blocks.0.img_attn.qkv": (96, 32, 1), "double_blocks.0.txt_mod.lin": (192, 32, 1),
             "single_blocks.1.linear1": (96 + 128, 32, 1), "final_layer.adaLN_modulation.1": (64, 32, 1),
             "time_in.in_layer": (32, 256, 1)},
    "sd1": SD1,
    "sd2": {**SD1, "input_blocks.1.1.transformer_blocks.0.attn2.to_k": (320, 1024, 1)},  # OpenCLIP's context
}
_SD_KOHYA = {path: body for path, (_, body) in _SD1.items()}
KOHYA = {"sd1": _SD_KOHYA, "sd2": _SD_KOHYA, "sdxl": {}, "flux": {}}  # SDXL / Flux: the LDM / BFL path with "_"


def kohya_body(fam: str, path: str) -> str:
    return KOHYA[fam].get(path, path.replace(".", "_"))


def lora_file(path, naming: str, fam: str, seed: int, *, alpha: float | None = None, header=None, modules=None):
    """A rank-2 fp16 file of `modules` (default: MODULES[fam]) in ComfyUI ("diffusion_model.<path>") or kohya names,
    the same tensors for the same seed; `alpha` on every module."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (d_out, d_in, k) in (modules or MODULES[fam]).items():
        name = "diffusion_model." + module if naming == "comfyui" else "lora_unet_" + kohya_body(fam, module)
        down, up = torch.randn(2, d_in, k, k, generator=g), torch.randn(d_out, 2, 1, 1, generator=g)
        tensors[f"{name}.lora_down.weight"] = (down if k > 1 else down.flatten(1)).half()
        tensors[f"{name}.lora_up.weight"] = (up if k > 1 else up.flatten(1)).half()
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path, metadata=header)
    return path


@pytest.mark.parametrize("modules, expected", [
    ({"double_blocks.3.img_mlp.0": (4, 4), "img_in": (4, 4)}, "flux"),
    ({"label_emb.0.0": (4, 4)}, "sdxl"),
    ({"input_blocks.4.1.transformer_blocks.1.attn1.to_q": (4, 4)}, "sdxl"),  # depth 2: SDXL's levels 1-2
    ({"output_blocks.4.1.proj_out": (640, 640)}, "sdxl"),  # output_blocks 3-5: 640 wide in SDXL, 1280 in SD 1.x
    ({"output_blocks.4.1.proj_out": (1280, 1280)}, "sd1"),
    ({"input_blocks.1.1.proj_in": (4, 4)}, "sd1"),  # attention at the first level: SD 1.x / 2.x only
    ({"output_blocks.10.0.in_layers.2": (4, 4)}, "sd1"),  # a fourth level
    ({"input_blocks.4.1.transformer_blocks.0.attn2.to_k": (4, 1024)}, "sd2"),  # cross-attention width
    ({"input_blocks.4.1.transformer_blocks.0.attn2.to_k": (4, 2048)}, "sdxl"),
    ({"input_blocks.4.1.transformer_blocks.0.attn1.to_q": (4, 4)}, None),  # SD 1.x and SDXL share it
    ({"label_emb.0.0": (4, 4), "input_blocks.1.1.proj_in": (4, 4)}, None),  # contradicts itself
    ({"joint_blocks.0.x_block.attn.qkv": (4, 4)}, None),  # another model (SD3)
])
def test_family_from_comfy_module_names(modules, expected):
    infos = {"diffusion_model." + m: ModuleInfo(shape, 2, "linear") for m, shape in modules.items()}
    assert family(infos) == expected


@pytest.mark.parametrize("fam", ["sd1", "sd2", "sdxl", "flux"])
def test_merging_comfy_with_kohya_files_is_the_merge_in_one_naming(tmp_path, fam):
    """comfy + kohya (either order) equals, delta for delta, the merge of the same two adapters in one naming."""
    files = {(naming, seed): lora_file(tmp_path / f"{naming}{seed}.safetensors", naming, fam, seed,
                                       alpha=1.0 if seed == 2 else None)
             for naming in ("comfyui", "kohya") for seed in (1, 2)}
    for first in ("comfyui", "kohya"):
        merged = {}
        for second in ("comfyui", "kohya"):
            out = tmp_path / f"{first}-{second}.safetensors"
            args = [str(files[first, 1]), str(files[second, 2]), "--method", "concat", "--dtype", "fp32"]
            assert main(["merge", *args, "-o", str(out), "-q"]) == 0
            merged[second] = ll.load_adapter(out)
        assert {a.metadata["format"] for a in merged.values()} == {first} and set(merged["comfyui"]) == set(
            merged["kohya"])
        for module in merged["kohya"]:
            assert torch.equal(merged["comfyui"][module].delta(), merged["kohya"][module].delta()), module


@pytest.mark.parametrize("fam", ["sd1", "sd2", "sdxl", "flux"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_convert_to_kohya_or_diffusers_and_back_is_exact(tmp_path, capsys, fam, fmt):
    comfy = lora_file(tmp_path / "c.safetensors", "comfyui", fam, 3)
    middle, back = tmp_path / f"m.{fmt}.safetensors", tmp_path / "back.safetensors"
    code, out, err = run_cli(capsys, "convert", comfy, "-o", middle, "--format", fmt)
    assert (code, err) == (0, "") and f"(comfyui, {fam}, {len(MODULES[fam])} modules)" in out
    assert run_cli(capsys, "convert", middle, "-o", back, "--format", "comfyui")[0] == 0
    if fmt == "kohya":  # sd-scripts' names: SDXL / Flux lora_unet_<path with _> (ComfyUI's loader rule), SD diffusers'
        assert set(ll.load_adapter(middle)) == {"lora_unet_" + kohya_body(fam, m) for m in MODULES[fam]}
    written, original = load_file(back), load_file(comfy)
    assert set(written) == set(original)
    if fmt == "kohya" or fam != "flux":  # renames only: the same fp16 tensors
        assert all(torch.equal(written[key], original[key]) for key in original)
    else:  # diffusers splits Flux's fused q / k / v and fuses them back (rank 3r, block-diagonal): the same deltas
        left, right = ll.load_adapter(back), ll.load_adapter(comfy)
        assert all(torch.allclose(left[m].delta(), right[m].delta(), atol=1e-6) for m in right)
    assert ll.load_adapter(back).metadata["family"] == fam


def test_the_family_is_recorded_where_the_names_do_not_say_it(tmp_path):
    shared = {"input_blocks.4.1.transformer_blocks.0.attn1.to_q": (640, 640, 1)}  # SD 1.x has it too
    header = {"ss_base_model_version": "sdxl_base_v1-0"}
    kohya = lora_file(tmp_path / "k.safetensors", "kohya", "sdxl", 4, header=header, modules=shared)
    out = ll.save_adapter(ll.load_adapter(kohya), tmp_path / "c.safetensors", format="comfyui")
    assert read_header(out)[1] == header
    assert ll.load_adapter(out).metadata["family"] == "sdxl"
    assert list(convert_adapter(ll.load_adapter(out), "kohya")) == list(ll.load_adapter(kohya))


def test_what_does_not_translate_is_refused_in_one_line(tmp_path, capsys):
    """What still has no name in the other naming: ComfyUI names that do not say their family (a block SD 1.x and
    SDXL share, no cross-attention, no header), another model's (SD3's joint blocks), a module the family's UNet
    lacks (SD 1.x's lowest level has no attention), a text encoder (not in the ComfyUI files read here). Each
    refusal names the file and the module, and writes nothing."""
    shared = {"input_blocks.4.1.transformer_blocks.0.attn1.to_q": (640, 640, 1)}
    unknown = lora_file(tmp_path / "u.safetensors", "comfyui", "sd1", 5, modules=shared)
    sd3 = lora_file(tmp_path / "s.safetensors", "comfyui", "sd1", 5, modules={"joint_blocks.0.x_block.attn.qkv":
                                                                             (96, 32, 1)})
    kohya = lora_file(tmp_path / "k.safetensors", "kohya", "sd1", 6)
    lowest = lora_file(tmp_path / "l.safetensors", "kohya", "sd1", 6, header={"ss_base_model_version": "sd_v1"},
                       modules={"down_blocks.3.attentions.0.proj_in": (1280, 1280, 1)})
    unsaid = "its adapter's module names do not say which base model it is for"
    cases = [(("merge", kohya, unknown, "-o", tmp_path / "m.safetensors"), unknown, ATTN, unsaid),
             (("convert", unknown, "-o", tmp_path / "x.safetensors", "--format", "kohya"), unknown, ATTN, unsaid),
             (("convert", sd3, "-o", tmp_path / "x.safetensors", "--format", "diffusers"), sd3,
              "diffusion_model.joint_blocks.0.x_block.attn.qkv", unsaid),
             (("convert", lowest, "-o", tmp_path / "x.safetensors", "--format", "comfyui"), lowest,
              "lora_unet_down_blocks_3_attentions_0_proj_in", "has no ComfyUI name; expected a Linear / Conv2d of the "
              "SD 1.x UNet (LDM names)")]
    for argv, name, module, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "\n" not in err, argv
        assert err.startswith(f"error: adapter '{name}', module '{module}': {message}"), err
    assert not any(tmp_path.glob("[mx].safetensors"))
    text = lora_file(tmp_path / "t.safetensors", "kohya", "sdxl", 7)
    tensors = {**load_file(text), **{f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.{s}": torch.zeros(2, 2)
                                     for s in ("lora_down.weight", "lora_up.weight")}}
    save_file(tensors, text)
    code, _, err = run_cli(capsys, "convert", text, "-o", tmp_path / "y.safetensors", "--format", "comfyui")
    assert code == 2 and "'lora_te1_text_model_encoder_layers_0_self_attn_q_proj': is no diffusion-model module" in err


@pytest.mark.parametrize("fam", ["sd1", "sd2", "sdxl"])
def test_unet_names_are_the_ldm_keys_of_diffusers_converter(fam):
    """Every Linear / Conv2d of a UNet (tiny SD 1.x / 2.x ones built from configs, SDXL's): its ComfyUI name, as a
    checkpoint key, lands on the same diffusers module in diffusers' own LDM -> diffusers converters, and its kohya
    name is sd-scripts' (SDXL: ComfyUI's path with "_"; SD 1.x / 2.x: the diffusers path's)."""
    diffusers = pytest.importorskip("diffusers")
    from test_names import SDXL, layer_names, ldm_converters_land, tiny_sd_unet

    if fam == "sdxl":
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = diffusers.UNet2DConditionModel(**SDXL)
    else:
        unet = tiny_sd_unet(fam)
    names = layer_names(unet, "unet.")
    dotted = ll.Adapter({n: LoraFactors(torch.full((1, 1), float(i)), torch.ones(1, 1)) for i, n in enumerate(names)},
                        {"format": "diffusers", "family": fam})
    comfy = convert_adapter(dotted, "comfyui")
    kohya = set(convert_adapter(comfy, "kohya"))
    assert kohya == set(convert_adapter(dotted, "kohya")) and len(kohya) == len(names)
    if fam == "sdxl":
        assert kohya == {"lora_unet_" + m[len("diffusion_model."):].replace(".", "_") for m in comfy}
    else:
        assert kohya == {"lora_unet_" + n[len("unet."):].replace(".", "_") for n in names}
    paths = {int(comfy[m].A[0].item()): m.removeprefix("diffusion_model.") for m in comfy}
    for convert, landed in ldm_converters_land([paths[i] for i in range(len(names))], dict(unet.config)).items():
        assert ["unet." + (path or "") for path in landed] == names, convert


def test_flux_names_are_the_bfl_keys_of_diffusers_converter(monkeypatch):
    """test_names checks the Flux map against diffusers' BFL -> diffusers converter with hand-written BFL checkpoint
    keys; run with our ComfyUI paths as those keys, it checks them."""
    pytest.importorskip("diffusers")
    import test_names

    def comfy_path(body: str) -> str:
        one = LoraFactors(torch.ones(1, 1), torch.ones(1, 1))
        kohya = ll.Adapter({"lora_unet_" + body: one}, {"format": "kohya", "family": "flux"})
        return next(iter(convert_adapter(kohya, "comfyui"))).removeprefix("diffusion_model.")

    monkeypatch.setattr(test_names, "_bfl_checkpoint_key", comfy_path)
    test_names.test_bfl_names_match_diffusers_flux_checkpoint_converter()
