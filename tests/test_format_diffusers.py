"""diffusers single files against diffusers and PEFT themselves: files made by save_lora_weights read to
PEFT's own deltas, files we write load with load_lora_weights / load_lora_into_transformer + fuse to
base + our delta (UNet incl. conv, CLIP, Flux), bytes are deterministic, and bad files fail with one line
naming the file, the module and what was expected."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_lego.errors import AdapterFormatError, OutputError
from lora_lego.formats import diffusers as dfmt
from lora_lego.formats.names import canonical_dotted, translate
from lora_lego.types import Adapter, LazyModules, LoraFactors
from sd_models import tiny_flux_transformer, tiny_sd_pipeline, weights

diffusers = pytest.importorskip("diffusers")

UNET_CONFIG = dict(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"],
                   rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3})
# out_proj too: diffusers' kohya text-encoder loader renames q / k / v only when an out_proj key is present
TE_CONFIG = dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "out_proj", "fc1"], use_rslora=True)
FLUX_RANKS = {"^proj_out": 2, "to_k": 3}


# ---------------------------------------------------------------- producers (also used by test_names.py)

def peft_deltas(model, component: str) -> dict[str, torch.Tensor]:
    """Canonical module path -> PEFT's get_delta_weight of the "default" adapter, in the base weight's layout."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        return {canonical_dotted(f"{component}.{name}"): layer.get_delta_weight("default").float()
                for name, layer in model.named_modules() if isinstance(layer, LoraLayer) and "default" in layer.lora_A}


def make_sd_lora(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """An SD 1.x-shaped LoRA (UNet attention + 3x3 / 1x1 conv, CLIP with rslora) saved by
    StableDiffusionPipeline.save_lora_weights with both configs as metadata; returns it and PEFT's deltas."""
    import transformers.integrations.peft as transformers_peft
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with torch.random.fork_rng(devices=[]), pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # transformers 5.24 gates add_adapter on peft >= 0.22 while load_adapter (the consumer) has no such gate
        patch.setattr(transformers_peft, "check_peft_version", lambda min_version: None)
        pipe = tiny_sd_pipeline()
        torch.manual_seed(11)
        unet_config, te_config = (LoraConfig(init_lora_weights=False, **c) for c in (UNET_CONFIG, TE_CONFIG))
        pipe.unet.add_adapter(unet_config)
        pipe.text_encoder.add_adapter(te_config)
        diffusers.StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
            text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
            unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=te_config.to_dict())
    return folder / "pytorch_lora_weights.safetensors", {**peft_deltas(pipe.unet, "unet"),
                                                         **peft_deltas(pipe.text_encoder, "text_encoder")}


def make_flux_lora(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LoRA on every Linear of the tiny Flux transformer (ranks 4, to_k 3, top-level proj_out 2), saved by
    FluxPipeline.save_lora_weights; returns it and PEFT's deltas."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = tiny_flux_transformer()
        targets = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, rank_pattern=FLUX_RANKS)
        torch.manual_seed(12)
        transformer.add_adapter(config)
        diffusers.FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                                 transformer_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors", peft_deltas(transformer, "transformer")


@pytest.fixture(scope="session")
def sd_lora(tmp_path_factory):
    return make_sd_lora(tmp_path_factory.mktemp("sd_lora"))


@pytest.fixture(scope="session")
def flux_lora(tmp_path_factory):
    return make_flux_lora(tmp_path_factory.mktemp("flux_lora"))


def assert_deltas(adapter: Adapter, reference: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert set(adapter.modules) == set(reference)
    for module, factors in adapter.items():
        expected = reference[module]
        assert expected.abs().max() > 0, module
        error = float((factors.delta().reshape(expected.shape) - expected).norm() / expected.norm())
        assert error < rtol, (module, error)


def fused_sd_weights(path: Path) -> tuple[dict, dict, dict, dict]:
    """(UNet before, UNet after, TE before, TE after) of a fresh tiny pipeline, after load_lora_weights + fuse_lora."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_sd_pipeline()
        before = weights(pipe.unet), weights(pipe.text_encoder)
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return before[0], weights(pipe.unet), before[1], weights(pipe.text_encoder)


def assert_fused(adapter: Adapter, unet: tuple[dict, dict], text_encoder: tuple[dict, dict], tol: float = 1e-5) -> None:
    """Every module's weight after fusing equals base + our delta; nothing else changed."""
    changed = {"unet": set(), "text_encoder": set()}
    for module, factors in adapter.items():
        component, _, rest = module.partition(".")
        before, after = unet if component == "unet" else text_encoder
        key = rest.removeprefix("text_model.") + ".weight"  # transformers 5's CLIPTextModel has no text_model level
        expected = before[key] + factors.delta().reshape(before[key].shape)
        assert (after[key] - before[key]).abs().max() > 0, module
        assert torch.allclose(after[key], expected, rtol=tol, atol=tol), module
        changed[component].add(key)
    for component, (before, after) in (("unet", unet), ("text_encoder", text_encoder)):
        assert all(torch.equal(before[k], after[k]) for k in before if k not in changed[component])


# ---------------------------------------------------------------- reading files of the real producers

def test_owns_is_disjoint_from_kohya():
    assert dfmt.owns("unet.down_blocks.0.resnets.0.conv1.lora_A.weight")
    assert dfmt.owns("base_model.model.layers.0.q_proj.lora_B.weight")
    assert dfmt.owns("transformer.x_embedder.alpha") and dfmt.owns("text_encoder.embed.lora_embedding_A")
    assert dfmt.owns("unet.a.lora_magnitude_vector") and dfmt.owns("unet.a.lora_B.bias")  # read refuses, saying why
    for key in ("lora_unet_down_blocks_0_attn1_to_q.lora_down.weight", "lora_te1_x.alpha", "lora_unet_x.lora_A.weight",
                "unet.a.weight", "unet.a.lora_down.weight"):
        assert not dfmt.owns(key), key


def test_reads_save_lora_weights_file_to_peft_deltas(sd_lora):
    path, reference = sd_lora
    adapter = dfmt.read(path)
    assert_deltas(adapter, reference)
    unet = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
    assert adapter.info("unet.down_blocks.0.resnets.0.conv1").kind == "conv3x3"
    assert adapter.info("unet.down_blocks.1.attentions.0.proj_in").kind == "conv1x1"
    assert adapter.info(f"{unet}.attn1.to_k").rank == 2
    scaling = adapter.metadata["scaling"]
    assert scaling[f"{unet}.attn1.to_q"] == 6 / 4 and scaling[f"{unet}.attn1.to_k"] == 6 / 2
    assert scaling[f"{unet}.attn1.to_v"] == 3 / 4
    assert scaling["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] == pytest.approx(5 / math.sqrt(2))
    meta = adapter.metadata
    assert (meta["format"], meta["family"], meta["dtype"], meta["folder"]) == ("diffusers", "sd1", "float32",
                                                                              str(path.resolve()))
    assert "lora_adapter_metadata" in meta["header"] and meta["task_type"] is None and meta["fan_in_fan_out"] is False


def test_lazy_reads_the_same_factors_on_access(sd_lora):
    path, _ = sd_lora
    eager, lazy = dfmt.read(path), dfmt.read(path, lazy=True)
    assert isinstance(lazy.modules, LazyModules) and list(lazy) == list(eager)
    for module in eager:
        assert lazy.info(module) == eager.info(module)
        assert torch.equal(lazy[module].A, eager[module].A) and torch.equal(lazy[module].B, eager[module].B)


def test_reads_flux_file_to_peft_deltas(flux_lora):
    path, reference = flux_lora
    adapter = dfmt.read(path)
    assert_deltas(adapter, reference)
    assert adapter.metadata["family"] == "flux"
    assert adapter.info("transformer.proj_out").rank == 2  # "^proj_out" is not single_transformer_blocks.0.proj_out
    assert adapter.info("transformer.single_transformer_blocks.0.proj_out").rank == 4


def test_scale_from_alpha_tensors_else_one(tmp_path):
    """Without metadata: alpha / r from `.alpha` tensors (ai-toolkit, Flux), else 1 (diffusers' alpha = r)."""
    generator = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 3, generator=generator), torch.randn(5, 2, generator=generator)
    save_file({"transformer.a.lora_A.weight": A, "transformer.a.lora_B.weight": B,
               "transformer.a.alpha": torch.tensor(8.0), "transformer.b.lora_A.weight": A.clone(),
               "transformer.b.lora_B.weight": B.clone()}, tmp_path / "f.safetensors")
    adapter = dfmt.read(tmp_path / "f.safetensors")
    assert torch.allclose(adapter["transformer.a"].delta(), 4 * B @ A, rtol=1e-6, atol=1e-6)
    assert torch.allclose(adapter["transformer.b"].delta(), B @ A, rtol=1e-6, atol=1e-6)


def test_bare_peft_weights_file_takes_its_folder_config(tmp_path):
    generator = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 3, generator=generator), torch.randn(5, 2, generator=generator)
    save_file({"base_model.model.layers.0.q.lora_A.weight": A, "base_model.model.layers.0.q.lora_B.weight": B},
              tmp_path / "adapter_model.safetensors")
    assert torch.allclose(dfmt.read(tmp_path / "adapter_model.safetensors")["layers.0.q"].delta(), B @ A)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 6}))
    adapter = dfmt.read(tmp_path / "adapter_model.safetensors")
    # sqrt(3) on each factor: products round differently from 3 * B @ A, so near-zero entries need an atol
    assert list(adapter) == ["layers.0.q"]
    assert torch.allclose(adapter["layers.0.q"].delta(), 3 * B @ A, rtol=1e-6, atol=1e-6)


def test_transformers5_clip_names_read_in_text_model_spelling(tmp_path):
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    save_file({"text_encoder.encoder.layers.0.mlp.fc1.lora_A.weight": A,
               "text_encoder.encoder.layers.0.mlp.fc1.lora_B.weight": B}, tmp_path / "f.safetensors")
    assert list(dfmt.read(tmp_path / "f.safetensors")) == ["text_encoder.text_model.encoder.layers.0.mlp.fc1"]


# ---------------------------------------------------------------- writing: the real consumers

def test_written_sd_file_fuses_in_diffusers_to_base_plus_delta(sd_lora, tmp_path):
    adapter = dfmt.read(sd_lora[0])
    out = dfmt.write(adapter, tmp_path / "ours.safetensors")
    unet_before, unet_after, te_before, te_after = fused_sd_weights(out)
    assert_fused(adapter, (unet_before, unet_after), (te_before, te_after))


def test_written_flux_file_fuses_in_diffusers_to_base_plus_delta(flux_lora, tmp_path):
    adapter = dfmt.read(flux_lora[0])
    via_kohya = translate(translate(adapter, "kohya"), "dotted")  # fused qkv and back
    out = dfmt.write(via_kohya, tmp_path / "ours.safetensors")
    before, after = fuse_into_flux(out)
    for module, factors in adapter.items():
        key = module.removeprefix("transformer.") + ".weight"
        assert torch.allclose(after[key], before[key] + factors.delta(), rtol=1e-5, atol=1e-6), module


def fuse_into_flux(path: Path) -> tuple[dict, dict]:
    """Weights of a fresh tiny Flux transformer before and after lora_state_dict + load_lora_into_transformer + fuse."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = tiny_flux_transformer()
        before = weights(transformer)
        state, alphas = diffusers.FluxPipeline.lora_state_dict(str(path), return_alphas=True)
        diffusers.FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=transformer)
        transformer.fuse_lora()
        transformer.unload_lora()
    return before, weights(transformer)


def test_header_round_trip_and_provenance(sd_lora, tmp_path):
    adapter = dfmt.read(sd_lora[0])
    adapter.metadata["header"] = {**adapter.metadata["header"], "ss_network_dim": "4", "modelspec.title": "x"}
    adapter.metadata["provenance"] = {"tool": "lora-lego", "method": "concat"}
    out = dfmt.write(adapter, tmp_path / "ours.safetensors")
    with safe_open(str(out), "pt") as handle:
        header = handle.metadata()
    assert set(header) == {"format", "lora_adapter_metadata", "lora_lego"} and header["format"] == "pt"
    assert json.loads(header["lora_lego"]) == {"tool": "lora-lego", "method": "concat"}
    config = json.loads(header["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"], config["text_encoder.r"]) == (4, 4, 2)
    assert config["unet.rank_pattern"] == config["unet.alpha_pattern"] != {}
    assert set(config["unet.rank_pattern"].values()) == {2}
    again = dfmt.read(out)
    assert set(again.metadata["scaling"].values()) == {1.0}
    for module, factors in adapter.items():
        assert again.info(module) == adapter.info(module)
        assert torch.allclose(again[module].delta(), factors.delta(), rtol=1e-6, atol=1e-7)
    tensors = load_file(out)
    assert tensors["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"].shape == (4, 4, 3, 3)
    assert tensors["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"].shape == (4, 4, 1, 1)


def test_bare_modules_get_an_unprefixed_config(tmp_path):
    factors = LoraFactors(torch.randn(2, 3), torch.randn(4, 2))
    adapter = Adapter({"layers.0.q": factors, "layers.0.v": LoraFactors(torch.randn(3, 3), torch.randn(4, 3))})
    out = dfmt.write(adapter, tmp_path / "bare.safetensors")
    with safe_open(str(out), "pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert config["r"] == 3 and config["rank_pattern"] == {r"layers\.0\.q": 2}
    assert torch.allclose(dfmt.read(out)["layers.0.q"].delta(), factors.delta())


def test_bytes_are_deterministic_and_dtype_is_honoured(sd_lora, tmp_path):
    adapter = dfmt.read(sd_lora[0], lazy=True)
    first = dfmt.write(adapter, tmp_path / "a.safetensors").read_bytes()
    assert dfmt.write(adapter, tmp_path / "b.safetensors").read_bytes() == first
    assert dfmt.write(adapter, tmp_path / "a.safetensors", overwrite=True).read_bytes() == first
    half = dfmt.write(adapter, tmp_path / "c.safetensors", dtype="bf16")
    assert {t.dtype for t in load_file(half).values()} == {torch.bfloat16}


def test_never_over_an_input_and_nothing_left_on_failure(sd_lora, tmp_path):
    path, _ = sd_lora
    before = path.read_bytes()
    with pytest.raises(OutputError, match="inside input"):
        dfmt.write(dfmt.read(path), path, overwrite=True)
    assert path.read_bytes() == before

    def broken(module):
        raise AdapterFormatError(f"module {module!r}: unreadable")

    good = dfmt.read(path)
    lazy = Adapter(LazyModules({m: good.info(m) for m in good}, broken), name="broken")
    with pytest.raises(AdapterFormatError, match="unreadable"):
        dfmt.write(lazy, tmp_path / "out" / "x.safetensors")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(AdapterFormatError, match="kohya names"):
        dfmt.write(Adapter({"lora_unet_x": good[next(iter(good))]}), tmp_path / "k.safetensors")
    with pytest.raises(AdapterFormatError, match="mix diffusers component prefixes"):
        dfmt.write(Adapter({"unet.a": good[next(iter(good))], "a": good[next(iter(good))]}), tmp_path / "m.safetensors")


# ---------------------------------------------------------------- bad files: one line naming file, module, expectation

A2, B2 = torch.randn(2, 3), torch.randn(4, 2)
M = "unet.down_blocks.0.attn1.to_q"
CONFIG = json.dumps({"unet.r": 8, "unet.lora_alpha": 8})
BAD = {
    "unpaired": ({f"{M}.lora_A.weight": A2}, {}, f"module '{M}': has lora_A but no lora_B; expected both"),
    "alpha only": ({f"{M}.alpha": torch.tensor(2.0)}, {}, "has an alpha but no lora_A"),
    "rank": ({f"{M}.lora_A.weight": A2, f"{M}.lora_B.weight": torch.randn(4, 3)}, {}, "expected the same rank"),
    "int": ({f"{M}.lora_A.weight": A2.to(torch.int32), f"{M}.lora_B.weight": B2}, {}, "expected a float tensor"),
    "nan": ({f"{M}.lora_A.weight": torch.full((2, 3), float("nan")), f"{M}.lora_B.weight": B2}, {}, "NaN"),
    "3-d": ({f"{M}.lora_A.weight": A2[None], f"{M}.lora_B.weight": B2}, {}, "expected 2-D"),
    "conv B": ({f"{M}.lora_A.weight": torch.randn(2, 3, 3, 3), f"{M}.lora_B.weight": torch.randn(4, 2, 3, 3)}, {},
               r"expected \(c_out, r, 1, 1\)"),
    "dora": ({f"{M}.lora_A.weight": A2, f"{M}.lora_B.weight": B2, f"{M}.lora_magnitude_vector": torch.ones(4)}, {},
             "DoRA"),
    "bias": ({f"{M}.lora_A.weight": A2, f"{M}.lora_B.weight": B2, f"{M}.lora_B.bias": torch.ones(4)}, {}, "lora_bias"),
    "kohya key": ({f"{M}.lora_A.weight": A2, f"{M}.lora_B.weight": B2,
                   "lora_unet_x.lora_down.weight": torch.ones(2, 3)}, {},
                  "not diffusers LoRA tensors"),
    "config rank": ({f"{M}.lora_A.weight": A2, f"{M}.lora_B.weight": B2}, {"lora_adapter_metadata": CONFIG},
                    "tensors have rank 2 but lora_adapter_metadata says r=8"),
    "alpha vs config": ({f"{M}.lora_A.weight": A2, f"{M}.lora_B.weight": B2, f"{M}.alpha": torch.tensor(3.0)},
                        {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 2})}, "disagrees with"),
    "json": ({f"{M}.lora_A.weight": A2, f"{M}.lora_B.weight": B2}, {"lora_adapter_metadata": "{"}, "not valid JSON"),
    "use_dora": ({f"{M}.lora_A.weight": A2, f"{M}.lora_B.weight": B2},
                 {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.use_dora": True})}, "DoRA adapters"),
    "rank_pattern fraction": ({f"{M}.lora_A.weight": A2, f"{M}.lora_B.weight": B2},
                              {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.rank_pattern": {"to_q": 1.5}})},
                              r"of 'unet': rank_pattern\['to_q'\] must be an integer; got 1.5"),
    "pattern regex": ({f"{M}.lora_A.weight": A2, f"{M}.lora_B.weight": B2},
                      {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.alpha_pattern": {"(": 2}})},
                      r"alpha_pattern key '\(' is not a regular expression"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_fail_with_one_line(case, tmp_path):
    tensors, metadata, expected = BAD[case]
    path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
    save_file(tensors, path, metadata={"format": "pt", **metadata})
    with pytest.raises(AdapterFormatError, match=expected) as caught:
        dfmt.read(path, lazy=False)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    if case not in ("dora", "bias", "kohya key", "json", "use_dora", "rank_pattern fraction", "pattern regex"):
        assert M in message


def test_registry_detects_reads_and_writes_diffusers_files(sd_lora, tmp_path):
    from lora_lego.formats import detect_format, load_adapter, save_adapter

    path, reference = sd_lora
    assert detect_format(path) == "diffusers"
    adapter = load_adapter(path, lazy=True)
    out = save_adapter(adapter, tmp_path / "again.safetensors")  # a diffusers adapter stays diffusers
    assert detect_format(out) == "diffusers"
    assert_deltas(load_adapter(out), reference)
