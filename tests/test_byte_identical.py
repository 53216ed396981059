"""Every output byte stays the same: a fixture set covering each format (PEFT folder, .bin folder, kohya with its
header and sshs hashes, LyCORIS LoHa / LoKr expanded, diffusers single files, SDXL and Flux renaming, GGUF) and
each registered method is written, and the sha256 of every file is compared with tests/data/byte_identical.json.

Deterministic: seeded generators, one torch thread, relative input paths (adapter names), no timestamps. The
package version is normalised to "0": the provenance's "version" field before writing, and apply's. The model
card (README.md) is checked for presence only: its text is card.py's, not a format's.
Regenerate (after a deliberate change of output): PYTHONPATH=src python tests/test_byte_identical.py --write
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import lora_lego as ll
from lora_lego.types import Adapter, LoraFactors

TABLE = Path(__file__).parent / "data" / "byte_identical.json"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOT_HASHED = ("README.md",)


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * 0.5


def in_memory(name: str, modules: dict[str, tuple[int, int, int, str]], seed: int, **metadata) -> Adapter:
    """An adapter of module -> (d_out, d_in, r, kind), factors from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    factors = {m: LoraFactors(randn(g, r, d_in), randn(g, d_out, r), kind)
               for m, (d_out, d_in, r, kind) in modules.items()}
    return Adapter(factors, {"dtype": "float32", **metadata}, name=name)


def peft_inputs(root: Path) -> None:
    """A rsLoRA PEFT folder (fp16, rank / alpha patterns, a negative alpha, an embedding) and a .bin one (bf16)."""
    g = torch.Generator().manual_seed(1)
    tensors, prefix = {}, "base_model.model.model."
    for layer in range(2):
        for kind, (d_out, d_in) in {"q_proj": (24, 16), "v_proj": (8, 16)}.items():
            r = 2 if kind == "v_proj" else 4
            tensors[f"{prefix}layers.{layer}.self_attn.{kind}.lora_A.weight"] = randn(g, r, d_in).half()
            tensors[f"{prefix}layers.{layer}.self_attn.{kind}.lora_B.weight"] = randn(g, d_out, r).half()
    tensors[f"{prefix}embed_tokens.lora_embedding_A"] = randn(g, 4, 50).half()
    tensors[f"{prefix}embed_tokens.lora_embedding_B"] = randn(g, 16, 4).half()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"v_proj": 2},
              "alpha_pattern": {"v_proj": -3}, "base_model_name_or_path": "tiny-llama", "task_type": "CAUSAL_LM",
              "target_modules": ["q_proj", "v_proj", "embed_tokens"]}
    write_folder(root / "peft_rs", config, tensors, "adapter_model.safetensors")
    tensors = {k: (v[:2] if "lora_A" in k else v[:, :2]).bfloat16() for k, v in tensors.items() if "q_proj" in k}
    write_folder(root / "peft_bin", {"peft_type": "LORA", "r": 2, "lora_alpha": 4}, tensors, "adapter_model.bin")


def write_folder(folder: Path, config: dict, tensors: dict, weights: str) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if weights.endswith(".bin"):
        torch.save(tensors, folder / weights)
    else:
        save_file(tensors, folder / weights)


def kohya_tensors(seed: int, alphas: dict[str, float | None]) -> dict[str, torch.Tensor]:
    """An SD 1.x kohya LoRA: attention (cross-attention to_k of d_in 768), LoCon 3x3, Tucker, text encoder."""
    g = torch.Generator().manual_seed(seed)
    unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
    shapes = {f"{unet}attn1_to_q": ((4, 16), (16, 4)), f"{unet}attn2_to_k": ((2, 768), (16, 2)),
              "lora_unet_down_blocks_0_resnets_0_conv1": ((4, 8, 3, 3), (8, 4, 1, 1)),
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((3, 32), (32, 3))}
    tensors = {}
    for module, (down, up) in shapes.items():
        tensors[f"{module}.lora_down.weight"] = randn(g, *down).half()
        tensors[f"{module}.lora_up.weight"] = randn(g, *up).half()
    tucker = "lora_unet_down_blocks_0_resnets_0_conv2"
    tensors |= {f"{tucker}.lora_down.weight": randn(g, 2, 8, 1, 1).half(),
                f"{tucker}.lora_mid.weight": randn(g, 3, 2, 3, 3).half(),
                f"{tucker}.lora_up.weight": randn(g, 8, 3, 1, 1).half()}
    for module, alpha in alphas.items():
        if alpha is not None:
            tensors[f"{module}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return tensors


def kohya_inputs(root: Path) -> None:
    unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
    header = {"ss_base_model_version": "sd_v1", "ss_network_dim": "4", "ss_network_alpha": "4", "ss_v2": "False",
              "ss_learning_rate": "0.0001", "sshs_model_hash": "stale", "ss_sd_model_name": "v1-5.safetensors"}
    alphas = {f"{unet}attn1_to_q": 2.0, f"{unet}attn2_to_k": 0.0, "lora_unet_down_blocks_0_resnets_0_conv1": 1.0,
              "lora_unet_down_blocks_0_resnets_0_conv2": 3.0}
    save_file(kohya_tensors(2, alphas), root / "kohya_a.safetensors", {**header, "modelspec.title": "Ä title"})
    save_file(kohya_tensors(3, alphas), root / "kohya_b.safetensors", {**header, "ss_learning_rate": "0.001"})
    g = torch.Generator().manual_seed(4)
    loha, lokr = f"{unet}attn1_to_q", f"{unet}attn1_to_v"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {f"{loha}.hada_w1_a": randn(g, 16, 2), f"{loha}.hada_w1_b": randn(g, 2, 16),
               f"{loha}.hada_w2_a": randn(g, 16, 2), f"{loha}.hada_w2_b": randn(g, 2, 16),
               f"{loha}.alpha": torch.tensor(1.0),
               f"{lokr}.lokr_w1": randn(g, 2, 4), f"{lokr}.lokr_w2_a": randn(g, 8, 2),
               f"{lokr}.lokr_w2_b": randn(g, 2, 4), f"{lokr}.alpha": torch.tensor(4.0),
               f"{conv}.hada_w1_a": randn(g, 8, 2), f"{conv}.hada_w1_b": randn(g, 2, 72),
               f"{conv}.hada_w2_a": randn(g, 8, 2), f"{conv}.hada_w2_b": randn(g, 2, 72)}
    save_file(tensors, root / "lycoris.safetensors", {"ss_network_module": "lycoris.kohya"})
    g = torch.Generator().manual_seed(5)
    sai = "lora_unet_input_blocks_4_1_transformer_blocks_0_"
    shapes = {f"{sai}attn1_to_q": (16, 16), f"{sai}attn2_to_k": (16, 2048),
              "lora_unet_input_blocks_1_0_in_layers_2": None, "lora_te1_text_model_encoder_layers_0_mlp_fc1": (64, 32),
              "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (32, 32)}
    tensors = {}
    for module, shape in shapes.items():
        down, up = ((2, 4, 3, 3), (4, 2, 1, 1)) if shape is None else ((2, shape[1]), (shape[0], 2))
        tensors |= {f"{module}.lora_down.weight": randn(g, *down), f"{module}.lora_up.weight": randn(g, *up),
                    f"{module}.alpha": torch.tensor(1.0)}
    save_file(tensors, root / "sdxl.safetensors")


def diffusers_inputs(root: Path) -> None:
    """SD 1.x diffusers files (component configs with patterns; .alpha tensors) and a Flux transformer file."""
    for seed, name in ((6, "diffusers_a"), (7, "diffusers_b")):
        g = torch.Generator().manual_seed(seed)
        block = "unet.down_blocks.0.attentions.0.transformer_blocks.0."
        shapes = {f"{block}attn1.to_q": ((4, 16), (16, 4)), f"{block}attn2.to_k": ((2, 768), (16, 2)),
                  "unet.down_blocks.0.resnets.0.conv1": ((4, 8, 3, 3), (8, 4, 1, 1)),
                  "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": ((3, 32), (32, 3))}
        tensors = {}
        for module, (a, b) in shapes.items():
            tensors |= {f"{module}.lora_A.weight": randn(g, *a).bfloat16(),
                        f"{module}.lora_B.weight": randn(g, *b).bfloat16()}
        config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"attn2.to_k": 2},
                  "unet.alpha_pattern": {"attn2.to_k": 1}, "text_encoder.r": 3, "text_encoder.lora_alpha": 3,
                  "text_encoder.use_rslora": True}
        save_file(tensors, root / f"{name}.safetensors", {"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    g = torch.Generator().manual_seed(8)
    tensors = {}
    for module, (d_out, d_in) in {"transformer.transformer_blocks.0.attn.to_q": (16, 16),
                                  "transformer.transformer_blocks.0.attn.to_k": (16, 16),
                                  "transformer.transformer_blocks.0.attn.to_v": (16, 16),
                                  "transformer.transformer_blocks.0.attn.to_out.0": (16, 16),
                                  "transformer.single_transformer_blocks.0.attn.to_q": (16, 16),
                                  "transformer.single_transformer_blocks.0.attn.to_k": (16, 16),
                                  "transformer.single_transformer_blocks.0.attn.to_v": (16, 16),
                                  "transformer.single_transformer_blocks.0.proj_mlp": (64, 16),
                                  "transformer.single_transformer_blocks.0.proj_out": (16, 80)}.items():
        tensors |= {f"{module}.lora_A.weight": randn(g, 2, d_in), f"{module}.lora_B.weight": randn(g, d_out, 2),
                    f"{module}.alpha": torch.tensor(4.0)}
    save_file(tensors, root / "flux.safetensors")


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2}


def llama_adapter(name: str, seed: int, rank: int) -> Adapter:
    modules = {f"model.layers.{i}.{p}": (d_out, 16, rank + i, "linear") for i in range(2)
               for p, d_out in (("self_attn.q_proj", 16), ("self_attn.k_proj", 8), ("mlp.down_proj", 16))}
    modules["model.embed_tokens"] = (16, 50, rank, "embedding")
    return in_memory(name, modules, seed, base_model_name_or_path="tiny-llama")


def base_checkpoint(folder: Path) -> None:
    """A tiny llama checkpoint for `apply` (a non-ASCII header value: how the writer escapes it is in the bytes)."""
    g = torch.Generator().manual_seed(40)
    shapes = {"model.embed_tokens.weight": (50, 16), "model.norm.weight": (16,)}
    for i in range(2):
        layer = f"model.layers.{i}"
        shapes |= {f"{layer}.self_attn.q_proj.weight": (16, 16), f"{layer}.self_attn.k_proj.weight": (8, 16),
                   f"{layer}.mlp.down_proj.weight": (16, 16)}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "tie_word_embeddings": False}))
    save_file({k: randn(g, *shape).bfloat16() for k, shape in shapes.items()}, folder / "model.safetensors",
              {"format": "pt", "note": "Ä"})


def method_adapters() -> list[Adapter]:
    shapes = {"q_proj": (24, 16, 3), "v_proj": (8, 16, 2)}  # one rank per module in every adapter (average)
    return [in_memory(f"task{i}", {f"model.layers.0.self_attn.{k}": (*s, "linear") for k, s in shapes.items()},
                      10 + i, base_model_name_or_path="tiny") for i in range(3)]


def calibrations(adapters: list[Adapter]) -> list:
    g = torch.Generator().manual_seed(20)
    out = []
    for i, adapter in enumerate(adapters):
        grams = {}
        for module in adapter:
            x = torch.randn(32, adapter.info(module).shape[1], generator=g)
            grams[module] = x.T @ x
        out.append(ll.Calibration(grams, {m: m for m in grams}, 32, {"model_fingerprint": "synthetic"}, name=f"cal{i}"))
    return out


def save(adapter: Adapter, path: str, **options) -> None:
    provenance = adapter.metadata.get("provenance")
    if provenance is not None:
        adapter.metadata["provenance"] = {**provenance, "version": "0"}  # the one normalised field
    ll.save_adapter(adapter, Path("out") / path, **options)


def write_outputs() -> None:
    """Every fixture output under ./out (inputs under ./in); the current folder is a fresh temporary one."""
    root = Path("in")
    root.mkdir()
    peft_inputs(root)
    kohya_inputs(root)
    diffusers_inputs(root)
    (root / "llama").mkdir()
    (root / "llama" / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    load = ll.load_adapter
    save(load("in/peft_rs"), "peft_rs")
    save(load("in/peft_rs"), "peft_rs_bf16", dtype="bf16")
    save(load("in/peft_bin"), "peft_bin")
    save(load("in/peft_rs"), "peft_rs.safetensors")
    kohya_a = load("in/kohya_a.safetensors")
    save(kohya_a, "kohya_a.safetensors")
    save(kohya_a, "kohya_a_diffusers.safetensors", format="diffusers")
    save(kohya_a, "kohya_a_peft", format="peft")
    save(ll.merge([kohya_a, load("in/kohya_b.safetensors", lazy=True)], "ties"), "kohya_ties.safetensors")
    save(load("in/lycoris.safetensors", expand=True), "lycoris.safetensors")
    save(load("in/lycoris.safetensors", expand_rank=2), "lycoris_r2.safetensors", dtype="fp16")
    save(load("in/sdxl.safetensors"), "sdxl_diffusers.safetensors", format="diffusers")
    diffusers_a = load("in/diffusers_a.safetensors")
    save(diffusers_a, "diffusers_a.safetensors")
    save(diffusers_a, "diffusers_a_kohya.safetensors", format="kohya")
    save(ll.merge([diffusers_a, load("in/diffusers_b.safetensors")], "concat"), "diffusers_concat.safetensors")
    unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
    mixed = in_memory("mixed", {f"{unet}attn1_to_q": (16, 16, 3, "linear"), f"{unet}attn1_to_k": (16, 16, 3, "linear"),
                                f"{unet}attn1_to_v": (16, 16, 2, "linear")}, 33, format="kohya", family="sd1")
    save(mixed, "mixed_bf16.safetensors", dtype="bf16")  # B carries r / alpha = 2 / 3, as stored in bf16
    save(load("in/flux.safetensors"), "flux_kohya.safetensors", format="kohya")
    save(load("out/flux_kohya.safetensors"), "flux_back.safetensors", format="diffusers")
    llama = llama_adapter("llama", 30, 2)
    save(llama, "llama.gguf", base_config="in/llama")
    save(llama, "llama_f16.gguf", base_config="in/llama", dtype="fp16")
    save(llama_adapter("llama2", 31, 3), "llama2.gguf", base_config="in/llama")
    save(llama_adapter("llama2", 31, 3), "llama2_bf16.gguf", base_config="in/llama", dtype="bf16")
    save(load("out/llama.gguf"), "llama_again.gguf")
    save(ll.merge([load("out/llama.gguf"), load("out/llama2.gguf")], "ties", rank=3), "llama_ties.gguf")
    save(load("out/llama.gguf"), "llama_peft")
    odd = in_memory("odd", {"model.layers.0.mlp.gäte": (8, 16, 2, "linear")}, 32)
    save(odd, "odd.safetensors")
    save(odd, "odd_peft")
    base_checkpoint(root / "base")
    ll.apply_adapter(llama, "in/base", "out/applied")
    ll.apply_adapter(load("out/llama.gguf"), "in/base", "out/applied_fp32", dtype="fp32", scale=0.5)
    adapters = method_adapters()
    grams = calibrations(adapters)
    for method in ll.available_methods():
        extra = {"calibration": grams} if ll.get_method(method).needs_calibration else {}
        save(ll.merge(adapters, method, weights=[1.0, 0.5, -0.25], seed=3, **extra), f"method_{method}")
    save(ll.prune(adapters[2], rank=2), "prune_svd")
    examples = [load(EXAMPLES / name) for name in ("rt_polarity", "snips_intent", "hyperbaton")]
    examples = [Adapter(a.modules, a.metadata, name=f"examples/{n}") for a, n in
                zip(examples, ("rt_polarity", "snips_intent", "hyperbaton"))]
    save(ll.merge(examples, rank=4), "readme_merged")


def digests(out: Path) -> dict[str, str]:
    table = {}
    for file in sorted(p for p in out.rglob("*") if p.is_file()):
        key = file.relative_to(out).as_posix()
        table[key] = "present" if file.name in NOT_HASHED else hashlib.sha256(file.read_bytes()).hexdigest()
    return table


def compute() -> dict[str, str]:
    from lora_lego.deploy import apply

    threads, version = torch.get_num_threads(), apply.version
    torch.set_num_threads(1)
    apply.version = lambda: "0"  # apply's provenance names the package version: the other normalised field
    try:
        write_outputs()
    finally:
        torch.set_num_threads(threads)
        apply.version = version
    return digests(Path("out"))


def test_outputs_are_byte_identical(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = json.loads(TABLE.read_text())
    found = compute()
    assert sorted(found) == sorted(expected), "the set of output files changed"
    changed = [key for key in expected if found[key] != expected[key]]
    assert not changed, f"outputs changed: {changed}"


if __name__ == "__main__":  # regenerate the table: PYTHONPATH=src python tests/test_byte_identical.py --write
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        table = compute()
    if "--write" in sys.argv:
        TABLE.parent.mkdir(exist_ok=True)
        TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{len(table)} files")
