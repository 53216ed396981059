"""kohya <-> dotted module names: every Linear / Conv2d of real diffusers UNets (SD 1.x defaults, SDXL), CLIP,
T5 and the Flux transformer translates and back; SAI and BFL names agree with diffusers' own converters;
translated adapters keep every delta exactly (Flux q/k/v fused and split) and load in diffusers."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file
from test_format_diffusers import assert_fused, fuse_into_flux, fused_sd_weights, make_flux_lora, make_sd_lora

from lora_lego.errors import AdapterFormatError
from lora_lego.formats import diffusers as dfmt
from lora_lego.formats.names import canonical_dotted, dotted_name, kohya_name, translate
from lora_lego.formats.names_ldm import to_diffusers, to_ldm
from lora_lego.types import Adapter, LazyModules, LoraFactors, conv_kind
from sd_models import tiny_flux_transformer, tiny_sd_unet

diffusers = pytest.importorskip("diffusers")
SDXL = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2, transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            use_linear_projection=True, attention_head_dim=(5, 10, 20))
where = repr


def layer_names(model, prefix: str) -> list[str]:
    return [f"{prefix}{name}" for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.fixture(scope="module")
def unets():
    """(SD 1.x default UNet2DConditionModel(), SDXL UNet), built on the meta device (names only)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.UNet2DConditionModel(), diffusers.UNet2DConditionModel(**SDXL)


@pytest.fixture(scope="module")
def text_encoders():
    """(CLIP-L, CLIP-G with projection, T5 encoder) of two layers, on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                          vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        return (CLIPTextModel(clip), CLIPTextModelWithProjection(clip),
                T5EncoderModel(T5Config(d_model=8, d_ff=16, num_heads=2, num_layers=2, vocab_size=100, d_kv=4,
                                        feed_forward_proj="gated-gelu")))


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory):
    return make_sd_lora(tmp_path_factory.mktemp("sd_lora"))


@pytest.fixture(scope="module")
def flux_lora(tmp_path_factory):
    return make_flux_lora(tmp_path_factory.mktemp("flux_lora"))


def random_adapter(shapes: dict[str, tuple[int, int]], rank: int = 2, seed: int = 0, **metadata) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    return Adapter({m: LoraFactors(torch.randn(rank, d_in, generator=generator),
                                   torch.randn(d_out, rank, generator=generator))
                    for m, (d_out, d_in) in shapes.items()}, dict(metadata), name="mem")


def assert_same_deltas(left: Adapter, right: Adapter, tol: float = 0.0) -> None:
    assert set(left.modules) == set(right.modules)
    for module in left:
        assert left.info(module).kind == right.info(module).kind, module
        assert (left[module].delta() - right[module].delta()).abs().max() <= tol, module


# ---------------------------------------------------------------- every real module name, both ways

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_unet_layer_round_trips(unets, family):
    names = layer_names(unets[0] if family == "sd1" else unets[1], "unet.")
    assert len(names) > 250
    kohya = [kohya_name(n, family, where) for n in names]
    assert len(set(kohya)) == len(names) and all(k.startswith("lora_unet_") and "." not in k for k in kohya)
    assert [dotted_name(k, family, where) for k in kohya] == names
    if family == "sdxl":
        proj_in = "unet.down_blocks.1.attentions.0.proj_in"
        assert kohya_name(proj_in, family, where) == "lora_unet_input_blocks_4_1_proj_in"
        assert kohya_name("unet.up_blocks.0.upsamplers.0.conv", family, where) == "lora_unet_output_blocks_2_2_conv"


def test_every_text_encoder_layer_round_trips(text_encoders):
    clip_l, clip_g, t5 = text_encoders
    cases = [("text_encoder.", clip_l, "sd1", "lora_te_"), ("text_encoder.", clip_l, "sdxl", "lora_te1_"),
             ("text_encoder_2.", clip_g, "sdxl", "lora_te2_"), ("text_encoder_2.", t5, "flux", "lora_te3_")]
    for prefix, model, family, kohya_prefix in cases:
        for name in layer_names(model, prefix):
            kohya = kohya_name(name, family, where)
            assert kohya.startswith(kohya_prefix), kohya
            assert dotted_name(kohya, family, where) == canonical_dotted(name)
    # transformers 5 dropped CLIPTextModel's text_model level; kohya files keep it, as real ones do
    assert kohya_name("text_encoder.encoder.layers.0.self_attn.q_proj", "sd1", where) == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert dotted_name("lora_te_encoder_layers_0_mlp_fc1", "sd1", where) == \
        "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    assert dotted_name("lora_te1_text_model_encoder_layers_1_self_attn_out_proj", "sdxl", where) == \
        "text_encoder.text_model.encoder.layers.1.self_attn.out_proj"


def test_flux_names_and_fusion_shapes():
    transformer = tiny_flux_transformer()
    shapes = {f"transformer.{n}": tuple(m.weight.shape) for n, m in transformer.named_modules()
              if isinstance(m, torch.nn.Linear)}
    adapter = random_adapter({m: s for m, s in shapes.items()}, family="flux")
    kohya = translate(adapter, "kohya")
    assert len(kohya) == 28 - 2 * 2 - 3 and all(m.startswith("lora_unet_") for m in kohya)
    assert kohya.info("lora_unet_double_blocks_0_img_attn_qkv").shape == (96, 32)
    assert kohya.info("lora_unet_single_blocks_0_linear1").shape == (3 * 32 + 128, 32)
    assert kohya.info("lora_unet_single_blocks_0_linear1").rank == 8
    assert {"lora_unet_img_in", "lora_unet_txt_in", "lora_unet_time_in_in_layer", "lora_unet_vector_in_out_layer",
            "lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1"} <= set(kohya)
    back = translate(kohya, "dotted")
    assert_same_deltas(back, adapter)
    assert all(back.info(m).rank == 2 for m in back)  # the block-diagonal B splits A too


# ---------------------------------------------------------------- against diffusers' own converters

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_ldm_block_map_is_diffusers_ldm_converter(unets, family):
    """Every Linear / Conv2d of a UNet of the layout (tiny SD 1.x / 2.x ones built from configs, the SDXL one):
    its LDM path, as a checkpoint key, lands on that module in diffusers' convert_ldm_unet_checkpoint (today's, and
    the older one in convert_from_ckpt, which also checks the upsampler's index: it finds it by position), and the
    map takes it back. A norm has no LDM name here (LoRAs leave norms alone)."""
    unet = unets[1] if family == "sdxl" else tiny_sd_unet(family)
    names = [n.removeprefix("unet.") for n in layer_names(unet, "unet.")]
    ldm = [to_ldm(name, family) for name in names]
    assert None not in ldm and len(set(ldm)) == len(names) > 250
    assert [to_diffusers(path, family) for path in ldm] == names
    for convert, landed in ldm_converters_land(ldm, dict(unet.config)).items():
        assert landed == names, convert
    if family != "sdxl":
        assert to_ldm("down_blocks.0.attentions.1.proj_in", family) == "input_blocks.2.1.proj_in"
        assert to_ldm("up_blocks.0.upsamplers.0.conv", family) == "output_blocks.2.1.conv"  # no attention before it
        assert to_ldm("up_blocks.3.attentions.2.proj_out", family) == "output_blocks.11.1.proj_out"
        assert to_ldm("up_blocks.0.resnets.0.norm1", family) is None
    assert to_ldm("down_blocks.0.attentions.0.proj_in", "sdxl") is None  # SDXL's first level has no attention


def ldm_converters_land(paths: list[str], config: dict) -> dict[str, list[str | None]]:
    """Where diffusers' LDM checkpoint converters (convert_ldm_unet_checkpoint: today's, and the older one in
    convert_from_ckpt, which finds an upsampler by its position) put the module of each LDM UNet path: converter
    name -> one diffusers path (or None) per path."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_unet_checkpoint as older

    found = {}
    for convert in (convert_ldm_unet_checkpoint, older):
        checkpoint = {f"model.diffusion_model.{path}.{p}": torch.tensor([float(i)]) for i, path in enumerate(paths)
                      for p in ("weight", "bias")}
        checkpoint.update({f"model.diffusion_model.out.0.{p}": torch.zeros(1) for p in ("weight", "bias")})  # a norm
        landed = {int(v.item()): k.removesuffix(".weight") for k, v in convert(checkpoint, config).items()
                  if k.endswith(".weight") and k != "conv_norm_out.weight"}
        found[convert.__module__] = [landed.get(index) for index in range(len(paths))]
    return found


def test_sai_names_match_diffusers_sgm_map(unets):
    """Our SDXL kohya names, given to diffusers' kohya loader, land on the same diffusers modules."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    names = layer_names(unets[1], "unet.")
    state = {}
    for index, name in enumerate(names):
        kohya = kohya_name(name, "sdxl", where)
        state[f"{kohya}.lora_down.weight"] = torch.full((1, 1), float(index))
        state[f"{kohya}.lora_up.weight"] = torch.zeros(1, 1)
        state[f"{kohya}.alpha"] = torch.tensor(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unets[1].config)
    converted = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    landed = {"unet." + k.removesuffix(".lora_A.weight"): int(v.item()) for k, v in converted.items() if "lora_A" in k}
    assert landed == {name: index for index, name in enumerate(names)}


def test_bfl_names_match_diffusers_flux_checkpoint_converter():
    """Our BFL map (fused q/k/v + MLP, final-layer (shift, scale) swap) equals diffusers' BFL -> diffusers
    checkpoint converter, applied to each kohya module's B (rows = output features; columns untouched).
    Its single-block split is hard-coded for Flux.1 (q, k, v of 3072 rows, MLP 12288), so the single block
    has Flux.1's sizes and the rest is tiny."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    d = 3072
    shapes = {f"transformer.single_transformer_blocks.0.{p}": (d, d) for p in ("attn.to_q", "attn.to_k", "attn.to_v")}
    shapes["transformer.single_transformer_blocks.0.proj_mlp"] = (4 * d, d)
    shapes.update({f"transformer.single_transformer_blocks.0.{p}": s
                   for p, s in (("proj_out", (4, 5 * 4)), ("norm.linear", (12, 4)))})
    block = "transformer.transformer_blocks.0."
    shapes.update({block + p: (12, 4) for p in ("norm1.linear", "norm1_context.linear")})
    attention = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")
    shapes.update({f"{block}attn.{p}": (4, 4) for p in attention})
    shapes.update({block + p: s for p, s in (("ff.net.0.proj", (16, 4)), ("ff.net.2", (4, 16)),
                                             ("ff_context.net.0.proj", (16, 4)), ("ff_context.net.2", (4, 16)))})
    shapes.update({"transformer." + p: (4, 3) for p in ("x_embedder", "context_embedder", "proj_out")})
    shapes.update({f"transformer.time_text_embed.{e}.linear_{i}": (4, 4) for e in ("timestep_embedder", "text_embedder")
                   for i in (1, 2)})
    shapes["transformer.norm_out.linear"] = (8, 4)
    adapter = random_adapter(shapes, rank=2, family="flux")
    kohya = translate(adapter, "kohya")
    checkpoint = {}
    for module, factors in kohya.items():
        bfl = _bfl_checkpoint_key(module.removeprefix("lora_unet_"))
        checkpoint[f"{bfl}.weight"] = factors.B.clone()
        checkpoint[f"{bfl}.bias"] = torch.zeros(factors.d_out)
    for key in ("double_blocks.0.img_attn.norm.query_norm", "double_blocks.0.img_attn.norm.key_norm",
                "double_blocks.0.txt_attn.norm.query_norm", "double_blocks.0.txt_attn.norm.key_norm",
                "single_blocks.0.norm.query_norm", "single_blocks.0.norm.key_norm"):
        checkpoint[f"{key}.scale"] = torch.zeros(1)
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    for module, factors in adapter.items():
        fused = kohya[_fused_name(kohya, module)]
        delta = converted[module.removeprefix("transformer.") + ".weight"] @ fused.A
        assert torch.allclose(delta, factors.delta(), atol=1e-4), module


def _bfl_checkpoint_key(body: str) -> str:
    """kohya body -> BFL checkpoint module path ("double_blocks_0_img_attn_qkv" -> "double_blocks.0.img_attn.qkv")."""
    for joined in ("double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
                   "time_in", "vector_in", "in_layer", "out_layer", "final_layer", "img_in", "txt_in",
                   "modulation_lin"):
        body = body.replace(joined, joined.replace("_", "~"))
    return body.replace("_", ".").replace("~", "_").replace("modulation_lin", "modulation.lin").replace(
        "adaLN.modulation", "adaLN_modulation")


def _fused_name(kohya: Adapter, module: str) -> str:
    from lora_lego.formats.names_flux import bfl_name

    return "lora_unet_" + bfl_name(module.removeprefix("transformer."))[0]


# ---------------------------------------------------------------- exact round trips of producer files; consumers

def kohya_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """A kohya file's tensors for an adapter in kohya naming (conv down 4-D). One alpha for every module,
    r / alpha folded into up: diffusers' kohya loader ignores a per-module alpha of attention modules that
    differs from the most common one (its alpha_pattern keys keep the "processor.to_k_lora" spelling)."""
    alpha = float(adapter.max_rank)
    state = {}
    for module, factors in adapter.items():
        down, up = factors.A, factors.B * (factors.rank / alpha)
        if factors.kind.startswith("conv"):
            kh, kw = (int(x) for x in factors.kind[4:].split("x"))
            down, up = down.reshape(factors.rank, -1, kh, kw), up[:, :, None, None]
        state.update({f"{module}.lora_down.weight": down.contiguous(), f"{module}.lora_up.weight": up.contiguous(),
                      f"{module}.alpha": torch.tensor(alpha)})
    return state


def test_sd_round_trip_is_exact_and_kohya_names_load_in_diffusers(sd_lora, tmp_path):
    adapter = dfmt.read(sd_lora[0])
    kohya = translate(adapter, "kohya")
    assert kohya.metadata["format"] == "kohya" and kohya.metadata["family"] == "sd1"
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in kohya
    assert kohya.info("lora_unet_down_blocks_0_resnets_0_conv1").kind == conv_kind((3, 3))
    back = translate(kohya, "dotted")
    assert back.metadata["format"] == "diffusers" and back.metadata["scaling"] == adapter.metadata["scaling"]
    assert_same_deltas(back, adapter)
    save_file(kohya_state_dict(kohya), tmp_path / "kohya.safetensors")
    unet_before, unet_after, te_before, te_after = fused_sd_weights(tmp_path / "kohya.safetensors")
    assert_fused(adapter, (unet_before, unet_after), (te_before, te_after))


def test_diffusers_kohya_converter_output_translates_to_the_same_modules(sd_lora):
    """A kohya file made by diffusers' convert_state_dict_to_kohya (PEFT alpha / r folded into B first)."""
    from diffusers.utils import convert_state_dict_to_kohya

    adapter = dfmt.read(sd_lora[0])
    peft_state = {}
    for module, factors in adapter.items():
        shape_a = (factors.rank, -1, 3, 3) if factors.kind == "conv3x3" else (factors.rank, -1, 1, 1)
        A, B = factors.A, factors.B
        if factors.kind.startswith("conv"):
            A, B = A.reshape(shape_a), B[:, :, None, None]
        peft_state[f"{module}.lora_A.weight"], peft_state[f"{module}.lora_B.weight"] = A, B
    state = convert_state_dict_to_kohya(peft_state)
    names = {key.split(".")[0] for key in state}
    modules = {}
    for name in names:
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        scale = float(state[f"{name}.alpha"]) / down.shape[0]
        kind = conv_kind(tuple(down.shape[2:])) if down.ndim == 4 else "linear"
        modules[name] = LoraFactors(down.flatten(1) * scale, up.flatten(1), kind)
    kohya = Adapter(modules, {"format": "kohya", "family": "sd1"})
    assert any(m.startswith("lora_te1_") for m in kohya)  # diffusers writes te1 even for SD 1.x
    assert_same_deltas(translate(kohya, "dotted"), adapter, tol=1e-6)


def test_flux_round_trip_exact_lazy_and_kohya_loads_in_diffusers(flux_lora, tmp_path):
    adapter = dfmt.read(flux_lora[0])
    lazy = dfmt.read(flux_lora[0], lazy=True)
    kohya, kohya_lazy = translate(adapter, "kohya"), translate(lazy, "kohya")
    assert isinstance(kohya_lazy.modules, LazyModules) and list(kohya_lazy) == list(kohya)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert kohya.info(qkv).rank == 4 + 3 + 4 and kohya.info("lora_unet_single_blocks_0_linear1").rank == 4 + 3 + 4 + 4
    assert torch.equal(kohya_lazy[qkv].B, kohya[qkv].B)
    back = translate(kohya_lazy, "dotted")
    assert isinstance(back.modules, LazyModules)
    assert_same_deltas(back, adapter)
    assert back.info("transformer.transformer_blocks.0.attn.to_k").rank == 3
    # diffusers' kohya Flux loader: double blocks only (its single-block linear1 split is hard-coded for Flux.1)
    double = {m: f for m, f in kohya.items() if "double_blocks" in m}
    save_file(kohya_state_dict(Adapter(double)), tmp_path / "kohya.safetensors")
    before, after = fuse_into_flux(tmp_path / "kohya.safetensors")
    for module in translate(Adapter(double, {"family": "flux"}), "dotted"):
        key = module.removeprefix("transformer.") + ".weight"
        assert torch.allclose(after[key], before[key] + adapter[module].delta(), rtol=1e-5, atol=1e-6), module


# ---------------------------------------------------------------- fusing and splitting, exactly

Q, K, V = (f"transformer.transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v"))
QKV = "lora_unet_double_blocks_0_img_attn_qkv"


def test_absent_partner_gets_zero_rows_and_stays_absent():
    adapter = random_adapter({Q: (6, 6), V: (6, 6)}, rank=2, family="flux")
    fused = translate(adapter, "kohya")[QKV]
    assert fused.shape == (18, 6) and fused.rank == 4
    expected = torch.cat([adapter[Q].delta(), torch.zeros(6, 6), adapter[V].delta()])
    assert torch.equal(fused.delta(), expected)
    back = translate(translate(adapter, "kohya"), "dotted")
    assert_same_deltas(back, adapter)


def test_absent_proj_mlp_keeps_its_rows_in_linear1():
    single = "transformer.single_transformer_blocks.0."
    adapter = random_adapter({single + "attn.to_q": (6, 6), single + "attn.to_v": (6, 6)}, family="flux")
    fused = translate(adapter, "kohya")["lora_unet_single_blocks_0_linear1"]
    assert fused.shape == (3 * 6 + 4 * 6, 6)  # FluxTransformer2DModel's proj_mlp: (4 * dim, dim)
    assert fused.delta()[6:12].abs().max() == 0 and fused.delta()[18:].abs().max() == 0
    assert_same_deltas(translate(translate(adapter, "kohya"), "dotted"), adapter)


def test_lazy_translation_reads_nothing_until_accessed(sd_lora):
    source = dfmt.read(sd_lora[0])
    reads = []

    def read(module):
        reads.append(module)
        return source[module]

    lazy = Adapter(LazyModules({m: source.info(m) for m in source}, read), dict(source.metadata))
    kohya = translate(lazy, "kohya")
    assert reads == [] and isinstance(kohya.modules, LazyModules)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert torch.equal(kohya[name].delta(), source["unet.down_blocks.0.resnets.0.conv1"].delta())
    assert reads == ["unet.down_blocks.0.resnets.0.conv1"]


def test_split_of_dense_and_of_block_diagonal_fused_modules():
    generator = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 6, generator=generator), torch.randn(18, 4, generator=generator)
    dense = translate(Adapter({QKV: LoraFactors(A, B)}, {"family": "flux"}), "dotted")
    for index, module in enumerate((Q, K, V)):
        assert dense.info(module).rank == 4 and torch.equal(dense[module].A, A)
        assert torch.equal(dense[module].delta(), (B @ A)[6 * index:6 * index + 6])
    blocks = B.clone()
    blocks[6:, :2], blocks[:6, 2:], blocks[12:, 2:] = 0, 0, 0  # sd-scripts split_qkv style: q uses 0-1, k 2-3, v none
    split = translate(Adapter({QKV: LoraFactors(A, blocks)}, {"family": "flux"}), "dotted")
    assert set(split.modules) == {Q, K} and split.info(Q).rank == 2 and split.info(K).rank == 2
    assert torch.equal(torch.cat([split[Q].delta(), split[K].delta(), torch.zeros(6, 6)]), blocks @ A)


def test_final_layer_swaps_shift_and_scale():
    adapter = random_adapter({"transformer.norm_out.linear": (8, 4)}, family="flux")
    fused = translate(adapter, "kohya")["lora_unet_final_layer_adaLN_modulation_1"]
    delta = adapter["transformer.norm_out.linear"].delta()
    assert torch.equal(fused.delta(), torch.cat([delta[4:], delta[:4]]))
    assert_same_deltas(translate(translate(adapter, "kohya"), "dotted"), adapter)


# ---------------------------------------------------------------- errors name the module and the expectation

ERRORS = [
    ("kohya", {"model.layers.0.q_proj": (4, 4)}, "sd1",
     "'model.layers.0.q_proj': has no kohya name; kohya files are for diffusion models"),
    ("kohya", {"transformer.pos_embed.proj": (4, 4)}, "flux", "'transformer.pos_embed.proj': has no kohya \\(BFL\\)"),
    ("kohya", {Q: (8, 6)}, "flux", "q / k / v are \\(6, 6\\) squares"),
    ("kohya", {"unet.foo_bar.conv": (4, 4)}, "sd1",
     "'unet.foo_bar.conv': its kohya name 'lora_unet_foo_bar_conv' would translate back to nothing"),
    ("kohya", {"unet.down_blocks.0.resnets.0.norm1": (4, 4)}, "sdxl", "has no SAI"),
    ("dotted", {"lora_unet_foo_bar": (4, 4)}, "sd1",
     "'lora_unet_foo_bar': cannot be translated .*'foo' is no identifier"),
    ("dotted", {"lora_unet_input_blocks_4_1_proj_in": (4, 4)}, "sd1",
     "SAI / LDM UNet names convert to diffusers names only for SDXL"),
    ("dotted", {"lora_te3_encoder_block_0_layer_0_SelfAttention_q": (4, 4)}, "sdxl", "lora_te3_ \\(T5\\)"),
    ("dotted", {QKV: (16, 6)}, "flux", "expected a linear \\(18, 6\\) fused Flux projection"),
    ("dotted", {"unet.x": (4, 4), "lora_unet_conv_in": (4, 4)}, "sd1", "'unet.x': is not a kohya module name"),
    ("dotted", {"lora_te_text_model_encoder_layers_0_mlp_fc1": (4, 4), "lora_te1_encoder_layers_0_mlp_fc1": (4, 4)},
     "sd1", "translates to 'text_encoder.text_model.encoder.layers.0.mlp.fc1', as"),
]


@pytest.mark.parametrize("naming, shapes, family, message", ERRORS)
def test_untranslatable_names_fail_naming_the_module(naming, shapes, family, message):
    with pytest.raises(AdapterFormatError, match=message) as caught:
        translate(random_adapter(shapes, family=family), naming)
    assert "adapter 'mem', module" in str(caught.value) and "\n" not in str(caught.value)


def test_kohya_file_written_through_the_registry_round_trips_and_loads(flux_lora, tmp_path):
    """save_adapter(format="kohya") fuses q / k / v (convert_adapter -> translate) and the kohya writer writes
    them; load_adapter reads the fused modules back and convert_adapter splits them, exactly. diffusers'
    kohya Flux loader takes the double blocks (its single-block split is hard-coded for Flux.1's sizes)."""
    from lora_lego.formats import convert_adapter, detect_format, load_adapter, save_adapter

    adapter = dfmt.read(flux_lora[0])
    out = save_adapter(adapter, tmp_path / "kohya.safetensors", format="kohya")
    assert detect_format(out) == "kohya"
    kohya = load_adapter(out)
    assert kohya.info("lora_unet_single_blocks_0_linear1").shape == (224, 32)
    assert_same_deltas(convert_adapter(kohya, "diffusers"), adapter, tol=1e-6)
    double = Adapter({m: adapter[m] for m in adapter if ".transformer_blocks." in m}, dict(adapter.metadata))
    before, after = fuse_into_flux(save_adapter(double, tmp_path / "double.safetensors", format="kohya"))
    for module, factors in double.items():
        key = module.removeprefix("transformer.") + ".weight"
        assert torch.allclose(after[key], before[key] + factors.delta(), rtol=1e-5, atol=1e-6), module
