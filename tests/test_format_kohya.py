"""kohya / LyCORIS single files against their real producer and consumer: files made by lycoris-lora on a tiny SD
pipeline read to LyCORIS' own weight deltas (LoRA, LoCon, Tucker, LoHa and LoKr expanded), DoRA and others
refused; our files load in diffusers with the exact deltas, round-trip, keep / recompute their metadata with
sd-scripts' hashes, and bad files fail with one line naming file, module and expectation."""

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_save

import lora_lego as ll
from conftest import name_seed
from lora_lego.errors import AdapterFormatError, OutputError
from lora_lego.formats import kohya
from lora_lego.types import Adapter, LazyModules, LoraFactors, ModuleInfo, conv_kind

sd_models = pytest.importorskip("sd_models", reason="needs the formats extra (diffusers)")
pytest.importorskip("lycoris", reason="needs the test extra (lycoris-lora)")

# LyCORIS' default preset "full" fails on diffusers 0.42's UNet; presets are class state, so name every field
PRESET = ('unet_target_module = [{}]\nunet_target_name = []\n'
          'text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\ntext_encoder_target_name = []\n')
FULL_PRESET = PRESET.format('"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"')
LINEAR_PRESET = PRESET.format('"Transformer2DModel"')
SPECS = {  # name -> (algo, network dim, alpha, network args); alphas differ from dims, conv ones from linear ones
    "lora": ("lora", 4, 2.0, {}),  # LINEAR_PRESET: attention, MLP and 1x1 projections only
    "locon": ("locon", 4, 2.0, {"conv_dim": 2, "conv_alpha": 3}),
    "locon_tucker": ("locon", 3, 5.0, {"conv_dim": 2, "conv_alpha": 1, "use_tucker": True}),
    "loha": ("loha", 3, 1.0, {"conv_dim": 3, "conv_alpha": 4}),  # r^2 = 9 > 4 channels: the dense route too
    "loha_tucker": ("loha", 2, 3.0, {"conv_dim": 2, "conv_alpha": 1, "use_tucker": True}),
    "lokr": ("lokr", 1, 3.0, {"conv_dim": 1, "conv_alpha": 2, "factor": -1, "decompose_both": True}),
    "lokr_tucker": ("lokr", 1, 3.0, {"conv_dim": 1, "conv_alpha": 2, "factor": 2, "use_tucker": True}),
    "dora": ("lora", 2, 1.0, {"dora_wd": True}),
}
HEADER = {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_sd_model_name": "tiny-sd",
          "ss_learning_rate": "0.0001", "ss_training_comment": "tiny é\nmodel"}
READABLE = ["lora", "locon", "locon_tucker", "loha", "loha_tucker", "lokr", "lokr_tucker"]


@dataclass
class Made:
    path: Path
    deltas: dict  # lora_name -> the weight update LyCORIS' forward applies, in the weight's shape
    modules: dict  # lora_name -> the LyCORIS module (for forward probes)


def lycoris_delta(module) -> torch.Tensor:
    """The weight update LyCORIS' forward applies (multiplier 1). LoCon: get_diff_weight. LoHa / LoKr:
    get_weight(shape) * scalar, as their forward: their get_diff_weight multiplies the scale in a second time."""
    from lycoris.modules.locon import LoConModule

    if isinstance(module, LoConModule):
        return module.get_diff_weight()[0].detach()
    return (module.get_weight(module.shape) * module.scalar).detach()


def make_file(folder: Path, name: str) -> Made:
    import lycoris.kohya

    algo, dim, alpha, args = SPECS[name]
    preset = folder / f"{name}.toml"
    preset.write_text(LINEAR_PRESET if name == "lora" else FULL_PRESET)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = sd_models.tiny_sd_pipeline()
        network = lycoris.kohya.create_network(1.0, dim, alpha, None, pipe.text_encoder, pipe.unet, algo=algo,
                                               preset=str(preset), **args)
        network.apply_to(pipe.text_encoder, pipe.unet, True, True)
    generator = torch.Generator().manual_seed(name_seed(name))
    with torch.no_grad():  # LyCORIS initialises one factor to zero: draw every parameter
        for _, parameter in sorted(network.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    path = folder / f"{name}.safetensors"
    metadata = {**HEADER, "ss_network_module": "lycoris.kohya", "ss_network_dim": str(dim),
                "ss_network_alpha": str(alpha), "ss_network_args": json.dumps({"algo": algo, **args}),
                "ss_output_name": name}
    if name == "locon":
        metadata["modelspec.title"] = "LoCon é"
    network.save_weights(str(path), torch.float32, metadata)
    with safe_open(path, "pt") as f:
        saved = f.metadata()
    save_file({rename(k): v for k, v in load_file(path).items()}, path, metadata=saved)
    loras = network.unet_loras + network.text_encoder_loras
    return Made(path, {rename(m.lora_name): lycoris_delta(m) for m in loras}, {rename(m.lora_name): m for m in loras})


def rename(key: str) -> str:
    """transformers 5's CLIPTextModel has no text_model level; real files say lora_te_text_model_encoder_..."""
    return key.replace("lora_te_encoder_", "lora_te_text_model_encoder_")


@pytest.fixture(scope="session")
def lycoris_files(tmp_path_factory):
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    folder = tmp_path_factory.mktemp("lycoris")
    return {name: make_file(folder, name) for name in SPECS}


def rel(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


def weight_delta(factors: LoraFactors, like: torch.Tensor) -> torch.Tensor:
    return factors.delta().reshape(like.shape)


# ---------------------------------------------------------------- reading real files


@pytest.mark.parametrize("name", READABLE)
def test_reads_lycoris_deltas_exactly(lycoris_files, name):
    made = lycoris_files[name]
    adapter = kohya.read(made.path, expand=name.startswith(("loha", "lokr")))
    assert set(adapter.modules) == set(made.deltas)
    for module, factors in adapter.items():
        reference = made.deltas[module]
        assert reference.abs().max() > 0, module
        assert rel(weight_delta(factors, reference), reference) < 1e-5, module
        base = made.modules[module].org_module[0]
        assert factors.kind == (conv_kind(base.kernel_size) if isinstance(base, torch.nn.Conv2d) else "linear"), module
        assert adapter.metadata["scaling"][module] == pytest.approx(made.modules[module].scale, rel=1e-6)
    meta = adapter.metadata
    assert (meta["format"], meta["family"], meta["dtype"]) == ("kohya", "sd1", "float32")
    assert meta["header"]["ss_training_comment"] == HEADER["ss_training_comment"]
    assert meta["folder"] == str(made.path.resolve())
    algo = {"loha": "LoHa", "lokr": "LoKr"}.get(SPECS[name][0])
    assert meta.get("lycoris") == ({algo: len(made.deltas)} if algo else None)


@pytest.mark.parametrize("name", READABLE)
def test_deltas_are_what_lycoris_forward_applies(lycoris_files, name):
    made = lycoris_files[name]
    adapter = kohya.read(made.path, expand=True)
    generator = torch.Generator().manual_seed(0)
    for module, layer in made.modules.items():
        base = layer.org_module[0]
        shape = (3, base.in_features) if isinstance(base, torch.nn.Linear) else (1, base.in_channels, 6, 6)
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            applied = layer(x) - layer.org_forward(x)
            ours = layer.op(x, weight_delta(adapter[module], base.weight), None, **layer.kw_dict)
        assert rel(ours, applied) < 1e-5, module


def test_files_hold_the_layouts_under_test(lycoris_files):
    def suffixes(name):
        return {key.split(".", 1)[1] for key in load_file(lycoris_files[name].path)}
    assert "lora_mid.weight" in suffixes("locon_tucker") and {"hada_t1", "hada_t2"} <= suffixes("loha_tucker")
    assert {"lokr_w1_a", "lokr_w1", "lokr_w2", "lokr_w2_a"} <= suffixes("lokr") and "lokr_t2" in suffixes("lokr_tucker")


def test_lazy_reads_the_same(lycoris_files):
    path = lycoris_files["lokr_tucker"].path
    eager, lazy = kohya.read(path, expand=True), kohya.read(path, lazy=True, expand=True)
    assert isinstance(lazy.modules, LazyModules) and list(lazy) == list(eager)
    for module in eager:
        assert lazy.info(module) == ModuleInfo.of(eager[module])
        assert torch.equal(lazy[module].A, eager[module].A) and torch.equal(lazy[module].B, eager[module].B)


def test_expand_rank_is_the_best_rank_k(lycoris_files):
    made = lycoris_files["loha"]  # r = 3: expansions of rank 9, above min(d_out, d_in) = 4 for the 4-channel convs
    adapter = kohya.read(made.path, expand_rank=2)
    dense_route = 0
    for module, factors in adapter.items():
        delta = made.deltas[module].flatten(1).double()
        s = torch.linalg.svdvals(delta)
        dense_route += min(delta.shape) < 9
        assert factors.rank == 2, module
        optimum = float(s[2:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        assert rel(factors.delta(), delta) == pytest.approx(optimum, rel=1e-3, abs=1e-6), module
    assert dense_route > 0
    exact = kohya.read(made.path, expand=True)
    for module in exact:  # min(r^2, d_out, d_in)
        assert exact.info(module).rank == min(9, *made.deltas[module].flatten(1).shape), module


@pytest.mark.parametrize("name, algo", [("loha", "LoHa"), ("lokr", "LoKr")])
def test_refuses_loha_lokr_without_expand(lycoris_files, name, algo):
    path = lycoris_files[name].path
    shown = f"{algo}: {len(lycoris_files[name].deltas)} module(s)"
    with pytest.raises(AdapterFormatError) as caught:
        kohya.read(path)
    message = str(caught.value)
    assert str(path) in message and shown in message and "\n" not in message
    assert "--expand" in message and "--expand-rank K" in message and "rank r^2" in message


def test_refuses_dora_even_with_expand(lycoris_files):
    path = lycoris_files["dora"].path
    with pytest.raises(AdapterFormatError) as caught:
        kohya.read(path, expand=True)
    message = str(caught.value)
    assert str(path) in message and f"DoRA: {len(lycoris_files['dora'].deltas)} module(s)" in message
    assert "base" in message


def test_refuses_every_non_additive_kind_with_counts(tmp_path):
    t = torch.ones
    tensors = {"lora_unet_a.weight": t(4), "lora_unet_a.on_input": t(()), "lora_unet_b.weight": t(4),
               "lora_unet_b.on_input": t(()), "lora_unet_c.oft_blocks": t(2, 2, 2), "lora_unet_d.a1.weight": t(2, 2),
               "lora_unet_d.a2.weight": t(2, 2), "lora_unet_e.diff": t(4, 4), "lora_unet_f.w_norm": t(4),
               "lora_unet_g.lora_down.weight": t(2, 4), "lora_unet_g.lora_up.weight": t(4, 2)}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path)
    with pytest.raises(AdapterFormatError) as caught:
        kohya.read(path)
    message = str(caught.value)
    for shown in ("IA3: 2 module(s)", "OFT / BOFT: 1", "GLoRA: 1", "full: 1", "norm: 1"):
        assert shown in message, shown
    assert str(path) in message


# ---------------------------------------------------------------- the real consumer: diffusers


def fused_changes(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """lora_name -> (base weight, weight after diffusers' load_lora_weights(path) + fuse_lora()), tiny SD pipeline."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = sd_models.tiny_sd_pipeline()
        parts = [("lora_unet_", pipe.unet), ("lora_te_text_model_", pipe.text_encoder)]
        base = {(prefix, name): module.weight.detach().clone() for prefix, model in parts
                for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
    fused = {}
    for (prefix, name), weight in base.items():
        module = dict(parts)[prefix].get_submodule(name)
        fused[prefix + name.replace(".", "_")] = (weight, getattr(module, "base_layer", module).weight.detach())
    return fused


@pytest.mark.parametrize("names", [("locon", "locon_tucker"), ("loha_tucker",)])
def test_diffusers_fuses_our_file_to_the_exact_deltas(lycoris_files, tmp_path, names):
    adapters = [kohya.read(lycoris_files[n].path, expand=True) for n in names]
    adapter = ll.merge(adapters, "concat") if len(adapters) > 1 else adapters[0]
    path = kohya.write(adapter, tmp_path / "ours.safetensors")
    changes = fused_changes(path)
    expected = {m: sum(lycoris_files[n].deltas[m] for n in names) for m in lycoris_files[names[0]].deltas}
    for module, delta in expected.items():
        base, fused = changes[module]
        assert rel(fused - base, delta) < 1e-5, module
    untouched = [m for m, (base, fused) in changes.items() if m not in expected and not torch.equal(base, fused)]
    assert untouched == []


def test_diffusers_fuses_a_mixed_rank_file_at_full_strength(lycoris_files, tmp_path):
    """Ranks that differ by module (here from a prune by error bound) load at their scale in diffusers: the
    file has one alpha, and B carries r / alpha (per-module alphas would miss its attention modules)."""
    adapter = kohya.read(lycoris_files["locon"].path)
    pruned = ll.prune(adapter, rank=4, method="task_arithmetic", max_error=0.3)
    assert len({pruned.info(m).rank for m in pruned}) > 1
    changes = fused_changes(kohya.write(pruned, tmp_path / "mixed.safetensors"))
    for module in pruned:
        base, fused = changes[module]
        assert rel(fused - base, pruned[module].delta().reshape(base.shape)) < 1e-5, module


# ---------------------------------------------------------------- writing: round trips and metadata


def save(tensors: dict, path: Path) -> Path:
    """safetensors' save_file of copies (it refuses tensors that share memory)."""
    save_file({key: value.clone() for key, value in tensors.items()}, path)
    return path


def header_of(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def sd_scripts_hashes(path: Path) -> dict[str, str]:
    """sd-scripts' precalculate_safetensors_hashes (library/train_util.py), from its documented algorithm: the
    file's tensors re-serialised by safetensors with only the ss_* metadata; sha256 of the bytes after the
    header (addnet_hash_safetensors) and the first 8 hex digits of the sha256 of bytes 0x100000..0x110000."""
    metadata = {k: v for k, v in header_of(path).items() if k.startswith("ss_")}
    data = safetensors_save(load_file(path), metadata)
    n = int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[8 + n:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def assert_hashes(path: Path) -> None:
    header = header_of(path)
    assert {k: header[k] for k in ("sshs_model_hash", "sshs_legacy_hash")} == sd_scripts_hashes(path)


def test_round_trip_keeps_deltas_and_training_metadata(lycoris_files, tmp_path):
    source = lycoris_files["locon_tucker"].path
    first = kohya.read(source)
    path = kohya.write(first, tmp_path / "again.safetensors")
    second = kohya.read(path)
    assert list(second) == list(first)
    alpha = float(header_of(path)["ss_network_alpha"])  # one alpha for the file: the most common rank
    for module, factors in first.items():
        if factors.rank == alpha:  # scale 1: the same float32 factors
            assert torch.equal(second[module].A, factors.A) and torch.equal(second[module].B, factors.B), module
        else:  # B carried r / alpha, the reader's alpha / r undoes it
            torch.testing.assert_close(second[module].delta(), factors.delta(), rtol=1e-5, atol=1e-6)
        assert second[module].kind == factors.kind
    header = header_of(path)
    for key in ("ss_learning_rate", "ss_output_name", "ss_training_comment", "ss_sd_model_name"):
        assert header[key] == header_of(source)[key], key
    assert header["ss_network_module"] == "networks.lora"
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("3", "3")
    assert json.loads(header["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "3"}  # no LyCORIS algo args
    # one alpha for the whole file (the most common rank): see kohya_write.file_alpha
    assert "modelspec.merged_from" not in header and header["sshs_model_hash"] != header_of(source)["sshs_model_hash"]
    assert_hashes(path)


def test_expanded_loha_is_written_as_plain_lora(lycoris_files, tmp_path):
    adapter = kohya.read(lycoris_files["loha"].path, expand=True)
    header = header_of(kohya.write(adapter, tmp_path / "plain.safetensors"))
    assert header["ss_network_module"] == "networks.lora" and header["ss_network_dim"] == "Dynamic"
    assert "algo" not in header["ss_network_args"]


def test_merge_metadata_keeps_what_the_inputs_share(lycoris_files, tmp_path):
    adapters = [kohya.read(lycoris_files[n].path) for n in ("locon", "locon_tucker")]
    path = kohya.write(ll.merge(adapters, "concat"), tmp_path / "merged.safetensors")
    header = header_of(path)
    assert header["modelspec.merged_from"] == "LoCon é, locon_tucker"  # its title, else the file name
    assert header["modelspec.title"] == "merged"
    for key in ("ss_base_model_version", "ss_v2", "ss_sd_model_name"):
        assert header[key] == HEADER[key], key
    for key in ("ss_learning_rate", "ss_training_comment", "ss_output_name"):  # one training run's, not the merge's
        assert key not in header, key
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("7", "7")  # 4 + 3 per linear module
    assert json.loads(header["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "7"}  # one alpha per file
    assert json.loads(header["lora_lego"])["method"] == "concat"
    assert_hashes(path)


def test_prune_max_error_is_dynamic_rank_by_frobenius_error(lycoris_files, tmp_path):
    # kohya's resize_lora.py --dynamic_method sv_fro --dynamic_param p keeps Frobenius energy >= p^2; our exact
    # counterpart is task_arithmetic (a truncated SVD) with max_error = sqrt(1 - p^2): the smallest rank per module
    made = lycoris_files["locon"]
    bound = 0.3
    pruned = ll.prune(kohya.read(made.path), rank=4, method="task_arithmetic", max_error=bound)
    for module, factors in pruned.items():
        s = torch.linalg.svdvals(made.deltas[module].flatten(1).double())
        tails = [float(s[k:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()) for k in range(1, len(s) + 1)]
        smallest = next(k for k, tail in enumerate(tails, start=1) if tail <= bound)
        assert factors.rank == min(smallest, 4), module
        assert rel(factors.delta(), made.deltas[module].flatten(1)) <= bound + 1e-6
    path = kohya.write(pruned, tmp_path / "dynamic.safetensors")
    header, again = header_of(path), kohya.read(path)
    assert len({pruned.info(m).rank for m in pruned}) > 1
    ranks = [pruned.info(m).rank for m in pruned]
    assert header["ss_network_dim"] == "Dynamic"
    assert header["ss_network_alpha"] == str(max(set(ranks), key=lambda r: (ranks.count(r), r)))
    assert header["ss_learning_rate"] == HEADER["ss_learning_rate"]  # one input: a resize keeps its training record
    assert again.ranks == pruned.ranks
    assert_hashes(path)


def test_hashes_of_a_file_past_the_legacy_window(tmp_path):
    generator = torch.Generator().manual_seed(0)
    modules = {f"lora_unet_block_{i}_proj": LoraFactors(torch.randn(96, 1024, generator=generator),
                                                        torch.randn(1024, 96, generator=generator)) for i in range(2)}
    adapter = Adapter(modules, {"format": "kohya", "header": {"ss_training_comment": "✓ é\n\"q\"", "other": "x"}})
    path = kohya.write(adapter, tmp_path / "big.safetensors")
    assert path.stat().st_size > 0x110000
    assert_hashes(path)
    header = header_of(path)
    assert header["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8] and "other" not in header
    data = path.read_bytes()  # our data section is safetensors' own: the model hash is its sha256
    assert hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest() == header["sshs_model_hash"]


def test_writes_are_deterministic(lycoris_files, tmp_path):
    merged = ll.merge([kohya.read(lycoris_files[n].path, lazy=True) for n in ("locon", "lora")], "concat")
    one, two = (kohya.write(merged, tmp_path / folder / "merged.safetensors") for folder in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()  # (a merge's modelspec.title is the output's name)


def test_bf16_rank_above_256_keeps_the_scale(tmp_path):
    generator = torch.Generator().manual_seed(0)
    A, B = torch.randn(257, 4, generator=generator), torch.randn(4, 257, generator=generator)
    path = kohya.write(Adapter({"lora_unet_x_proj": LoraFactors(A, B)}, {}), tmp_path / "bf.safetensors", dtype="bf16")
    stored = load_file(path)
    assert float(stored["lora_unet_x_proj.alpha"]) == 256.0  # 257 is not a bf16 number
    assert torch.equal(stored["lora_unet_x_proj.lora_up.weight"], (B * (257 / 256)).to(torch.bfloat16))
    assert rel(kohya.read(path)["lora_unet_x_proj"].delta(), B @ A) < 2e-2


def test_failed_write_leaves_nothing_and_inputs_are_refused(lycoris_files, tmp_path):
    def read(module):
        if module.endswith("1"):
            raise AdapterFormatError("damaged")
        return LoraFactors(torch.ones(2, 4), torch.ones(4, 2))
    broken = Adapter(LazyModules({f"lora_unet_m{i}": ModuleInfo((4, 4), 2) for i in range(3)}, read), {})
    out = tmp_path / "out"
    with pytest.raises(AdapterFormatError, match="damaged"):
        kohya.write(broken, out / "x.safetensors")
    assert list(out.iterdir()) == []
    source = lycoris_files["lora"].path
    before = source.read_bytes()
    with pytest.raises(OutputError, match="lies inside input"):
        kohya.write(kohya.read(source), source, overwrite=True)
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep")
    with pytest.raises(OutputError, match="already exists"):
        kohya.write(kohya.read(source), existing)
    assert source.read_bytes() == before and existing.read_bytes() == b"keep"


@pytest.mark.parametrize("modules, expected", [
    ({"unet.down.to_q": LoraFactors(torch.ones(2, 4), torch.ones(4, 2))}, "not a kohya lora_name"),
    ({"lora_te_embed": LoraFactors(torch.ones(2, 4), torch.ones(4, 2), "embedding")}, "embedding LoRA"),
])
def test_writer_refuses_what_kohya_cannot_hold(tmp_path, modules, expected):
    with pytest.raises(AdapterFormatError) as caught:
        kohya.write(Adapter(modules, {}, name="mem"), tmp_path / "x.safetensors")
    assert expected in str(caught.value) and next(iter(modules)) in str(caught.value)
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- synthetic files: alpha rules and bad input


def test_alpha_rules(tmp_path):
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 4, generator=g), torch.randn(3, 2, generator=g)
    tensors = {}
    for module, alpha in (("lora_unet_none", None), ("lora_unet_zero", 0.0), ("lora_unet_neg", -3.0),
                          ("lora_unet_one", 1.0)):
        tensors |= {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up}
        if alpha is not None:
            tensors[f"{module}.alpha"] = torch.tensor(alpha)
    save(tensors, tmp_path / "a.safetensors")
    adapter = kohya.read(tmp_path / "a.safetensors")
    expected = {"lora_unet_none": 1.0, "lora_unet_zero": 1.0, "lora_unet_neg": -1.5, "lora_unet_one": 0.5}
    assert adapter.metadata["scaling"] == expected
    for module, scale in expected.items():
        assert rel(adapter[module].delta(), scale * up @ down) < 1e-6, module


def test_owns_kohya_keys_only():
    assert kohya.owns("lora_unet_down_blocks_0_attn1_to_q.lora_down.weight") and kohya.owns("lora_te2_x.alpha")
    assert kohya.owns("lora_unet_double_blocks_0_img_attn_qkv.lokr_w1")
    assert not kohya.owns("unet.down_blocks.0.lora_A.weight") and not kohya.owns("base_model.model.x.lora_A.weight")


M = "lora_unet_mid_block_attentions_0_proj_in"
DOWN, UP = torch.ones(2, 8), torch.ones(4, 2)
BAD = {  # case -> (tensors, what the message must say)
    "up without down": ({f"{M}.lora_up.weight": UP}, "has lora_up.weight but no lora_down.weight"),
    "down without up": ({f"{M}.lora_down.weight": DOWN}, "has lora_down.weight but no lora_up.weight"),
    "rank mismatch": ({f"{M}.lora_down.weight": DOWN, f"{M}.lora_up.weight": torch.ones(4, 3)}, "rank mismatch"),
    "conv up not 1x1": ({f"{M}.lora_down.weight": torch.ones(2, 4, 3, 3),
                         f"{M}.lora_up.weight": torch.ones(4, 2, 3, 3)}, "(c_out, r, 1, 1)"),
    "alpha nan": ({f"{M}.lora_down.weight": DOWN, f"{M}.lora_up.weight": UP, f"{M}.alpha": torch.tensor(float("nan"))},
                  "alpha is nan; expected a finite number"),
    "alpha not 0-d": ({f"{M}.lora_down.weight": DOWN, f"{M}.lora_up.weight": UP, f"{M}.alpha": torch.ones(1)},
                      "expected a 0-d tensor"),
    "unknown suffix": ({f"{M}.lora_down.weight": DOWN, f"{M}.lora_up.weight": UP, f"{M}.lora_side.weight": UP},
                       "unknown tensor suffix(es) 'lora_side.weight'; expected the suffixes of one of LoRA: lora_down"),
    "only alpha": ({f"{M}.alpha": torch.tensor(1.0)}, "only an alpha"),
    "mixed algorithms": ({f"{M}.lora_down.weight": DOWN, f"{M}.lora_up.weight": UP, f"{M}.hada_w1_a": UP},
                         "mixes LoRA and LoHa keys"),
    "integer factor": ({f"{M}.lora_down.weight": DOWN.long(), f"{M}.lora_up.weight": UP}, "expected a float tensor"),
    "nan factor": ({f"{M}.lora_down.weight": DOWN, f"{M}.lora_up.weight": UP * float("inf")},
                   "lora_up.weight contains NaN or Inf"),
    "huge factor": ({f"{M}.lora_down.weight": DOWN * 1e9, f"{M}.lora_up.weight": UP}, "expected |values| <="),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_fail_with_file_module_and_expectation(tmp_path, case):
    tensors, expected = BAD[case]
    path = save(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(AdapterFormatError) as caught:
        kohya.read(path)
    message = str(caught.value)
    assert str(path) in message and M in message and expected in message and "\n" not in message


def test_bad_keys_and_options(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"unet.x.lora_A.weight": DOWN}, path)
    with pytest.raises(AdapterFormatError, match="is not a kohya key"):
        kohya.read(path)
    save_file({f"{M}.lora_down.weight": DOWN, f"{M}.lora_up.weight": UP}, path)
    with pytest.raises(AdapterFormatError, match="expand_rank must be an integer >= 1"):
        kohya.read(path, expand_rank=0)
    with pytest.raises(AdapterFormatError, match="no such file"):
        kohya.read(tmp_path / "missing.safetensors")
    assert os.path.exists(path)


TE = "text_model_encoder_layers_0_self_attn_q_proj"


def _kohya_file(path: Path, modules: list[str], d: int = 8) -> Path:
    tensors = {}
    for module in modules:
        tensors.update({f"{module}.lora_down.weight": torch.ones(2, d) / 8,
                        f"{module}.lora_up.weight": torch.ones(d, 2), f"{module}.alpha": torch.tensor(2.0)})
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("modules", [
    [f"lora_te_{TE}", f"lora_te2_{TE}"],  # SD 1.x's text encoder beside SDXL's second one
    [f"lora_te_{TE}", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"],  # SD 1.x TE, SDXL UNet
    ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_down_blocks_0_attentions_0_proj_in"],  # Flux and a UNet
], ids=["te-and-te2", "te-and-sgm-unet", "flux-and-unet"])
def test_keys_of_two_families_are_refused(tmp_path, modules):
    path = _kohya_file(tmp_path / "mixed.safetensors", modules)
    with pytest.raises(AdapterFormatError, match=r"'.*mixed.safetensors': module names of two model families "
                                                 r"\(.*\); expected the modules of one base model"):
        ll.load_adapter(path)


def test_text_encoder_only_files_have_a_family_and_sd1_does_not_merge_with_sdxl(tmp_path):
    sd1 = ll.load_adapter(_kohya_file(tmp_path / "sd1.safetensors", [f"lora_te_{TE}"]))
    sdxl_te1 = ll.load_adapter(_kohya_file(tmp_path / "xl1.safetensors", [f"lora_te1_{TE}"]))
    sdxl = ll.load_adapter(_kohya_file(tmp_path / "xl.safetensors", [f"lora_te1_{TE}", f"lora_te2_{TE}"]))
    assert [a.metadata["family"] for a in (sd1, sdxl_te1, sdxl)] == ["sd1", "sdxl", "sdxl"]
    for other in (sdxl_te1, sdxl):
        with pytest.raises(ll.IncompatibleAdaptersError, match="different base-model families"):
            ll.merge([sd1, other], "concat")
    assert ll.merge([sdxl_te1, sdxl], "concat").metadata["family"] == "sdxl"
    # a UNet file keeps lora_te1_ ambiguous (diffusers' converter writes it for SD 1.x): the UNet decides
    sd1_unet = _kohya_file(tmp_path / "u.safetensors",
                           [f"lora_te1_{TE}", "lora_unet_down_blocks_0_attentions_0_proj_in"])
    assert ll.load_adapter(sd1_unet).metadata["family"] == "sd1"
