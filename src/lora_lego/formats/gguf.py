"""llama.cpp / ollama GGUF LoRA adapters (general.type = adapter, adapter.type = lora).

Written with gguf-py's HF -> GGUF tensor names (`blk.N.attn_q.weight.lora_a` / `.lora_b`), the Llama
q/k row permutation of llama.cpp's converter applied to B, and every module's scale folded into B so
that llama.cpp's single `adapter.lora.alpha` (scale alpha / rank) is right for mixed ranks, rsLoRA and
per-module alphas. This file holds the names, the architecture table and the writer; `gguf_read.py`
reads f32 / f16 / bf16 files back, so several GGUF adapters merge into one (llama.cpp merges
adapters only into a base model). Needs the `gguf` package (extra [gguf]).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFormatError, some
from ..hub import resolve
from ..outputs import atomic_output, cast_finite, check_output_path, output_dtype, source_folders
from ..types import Adapter, LoraFactors
from .files import tie_word_embeddings
from .ranks import alpha_folded
from .record import record

SUFFIX = ".gguf"
MAGIC = b"GGUF"
CONFIG_KEY = "lora_lego.base_config"  # our own KV: what reading the file back needs (architecture, head counts)
PROVENANCE_KEY = "lora_lego.provenance"
# transformers architecture -> (llama.cpp architecture, q/k rows permuted), as llama.cpp's
# convert_hf_to_gguf.py registers them (LlamaModel and its subclasses with undo_permute = True)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
    "MixtralForCausalLM": ("llama", True), "SmolLM3ForCausalLM": ("smollm3", True),
    "ArceeForCausalLM": ("arcee", True), "Qwen2ForCausalLM": ("qwen2", False), "Qwen3ForCausalLM": ("qwen3", False),
}
PERMUTED = {arch: permuted for arch, permuted in ARCHITECTURES.values()}
# transformers module names of these decoders; reading inverts gguf-py's map over them
HF_MODULES = ("model.embed_tokens", "lm_head") + tuple(
    f"model.layers.{{i}}.{part}" for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
_WRITE_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def gguf_module():
    """The `gguf` package, or AdapterFormatError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise AdapterFormatError("GGUF adapters need the gguf package: pip install \"lora-lego[gguf]\" "
                                 "(or pip install gguf)") from None
    return gguf


def is_gguf(path: Path) -> bool:
    """True for a file named *.gguf or starting with the GGUF magic."""
    if path.suffix == SUFFIX:
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == MAGIC
    except OSError:
        return False


def base_config(adapter: Adapter | None, base: str | Path | None, where: str) -> dict[str, Any]:
    """The base model's config.json as a dict: from `base` (a folder or the file), else from the adapter's
    base_model_name_or_path when that is a local folder. Raises AdapterFormatError when neither exists."""
    candidates = [resolve(base, kind="config").path] if base is not None else []  # a local folder, or a Hub id
    local = (adapter.metadata.get("base_model_name_or_path") if adapter is not None else None) or ""
    if base is None and local and Path(local).is_dir():
        candidates.append(Path(local))
    for candidate in candidates:
        file = candidate / "config.json" if candidate.is_dir() else candidate
        if not file.is_file():
            raise AdapterFormatError(f"{where}: base config {str(candidate)!r} has no config.json")
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise AdapterFormatError(f"{where}: cannot read base config {str(file)!r} ({error})") from None
        return config.get("text_config", config) if "architectures" not in config else config
    raise AdapterFormatError(f"{where}: a GGUF adapter needs the base model's config.json (llama.cpp architecture, "
                             f"layer and head counts): pass --base-config DIR (base_config=...); the adapter's "
                             f"base_model_name_or_path {local or None!r} is not a local folder")


def recorded_config(architectures: list[str], shape: dict[str, int]) -> dict[str, Any]:
    """The part of a transformers config our GGUF files record (and `architecture` reads back)."""
    return {"architectures": list(architectures), "num_hidden_layers": shape["layers"],
            "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"]}


def architecture(config: dict[str, Any], where: str) -> tuple[str, dict[str, int]]:
    """(llama.cpp architecture, {"layers", "heads", "kv_heads"}) of a transformers config."""
    names = config.get("architectures") or []
    known = [name for name in names if name in ARCHITECTURES]
    if not known:
        raise AdapterFormatError(f"{where}: base architecture {names or None} is not supported for GGUF adapters; "
                                 f"supported: {', '.join(ARCHITECTURES)}")
    try:
        heads = int(config["num_attention_heads"])
        shape = {"layers": int(config["num_hidden_layers"]), "heads": heads,
                 "kv_heads": int(config.get("num_key_value_heads") or heads)}
    except (KeyError, TypeError, ValueError) as error:
        raise AdapterFormatError(f"{where}: base config lacks {error} (needed for GGUF tensor names)") from None
    return ARCHITECTURES[known[0]][0], shape


def permute_rows(B: torch.Tensor, heads: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, the two rotary halves interleaved.

    B is of shape (d_out, r) with d_out = heads * head_dim; row h*hd + 2i + j of the result is row
    h*hd + j*hd/2 + i of B (j in {0, 1}). `inverse` undoes it.
    """
    d_out = B.shape[0]
    if d_out % (2 * heads):
        raise AdapterFormatError(f"{d_out} rows cannot be split into {heads} heads of even size")
    split = (heads, 2, d_out // heads // 2) if not inverse else (heads, d_out // heads // 2, 2)
    return B.reshape(*split, B.shape[1]).transpose(1, 2).reshape(B.shape)


def permuted_heads(gguf_name: str, arch: str, shape: dict[str, int]) -> int | None:
    if not PERMUTED.get(arch):
        return None
    kind = gguf_name.rsplit(".", 1)[-1]
    return {"attn_q": shape["heads"], "attn_k": shape["kv_heads"]}.get(kind)


def tensor_name_map(arch: str, layers: int):
    gguf = gguf_module()
    arch_id = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    return gguf.get_tensor_name_map(arch_id, layers)


def gguf_names(modules: list[str], arch: str, layers: int, where: str) -> dict[str, str]:
    """Module path -> GGUF tensor base name (without ".weight"), by gguf-py's map for `arch`."""
    name_map = tensor_name_map(arch, layers)
    names = {module: name_map.get_name(module) for module in modules}
    unknown = [module for module, name in names.items() if name is None]
    if unknown:
        raise AdapterFormatError(f"{where}: module(s) {some(unknown)} have no llama.cpp ({arch}) tensor name; "
                                 f"GGUF adapters name the modules of a transformers decoder "
                                 f"(e.g. 'model.layers.0.self_attn.q_proj')")
    return names  # type: ignore[return-value]


def write(adapter: Adapter, path: Path, *, dtype: str | torch.dtype | None = None, overwrite: bool = False,
          base_config_path: str | Path | None = None) -> Path:
    """Write a llama.cpp LoRA adapter file, one module in memory at a time.

    adapter.lora.alpha is the most common rank; a module of rank r gets r / alpha folded into B, so
    llama.cpp's scale alpha / r gives back exactly the stored delta. token_embd's lora_a is written
    transposed, (num_embeddings, r), as llama.cpp gathers its rows.
    """
    where = f"output {str(path)!r}"
    gguf = gguf_module()
    config = _output_config(adapter, base_config_path, where)
    arch, shape = architecture(config, where)
    _check_modules(adapter, config, where)
    names = gguf_names(list(adapter), arch, shape["layers"], where)
    torch_dtype = _write_dtype(adapter, dtype, where)
    raw = getattr(gguf.GGMLQuantizationType, _WRITE_TYPES[torch_dtype])
    alpha = Counter(adapter.ranks.values()).most_common(1)[0][0] if len(adapter) else 1
    check_output_path(path, source_folders(adapter), overwrite=overwrite)
    with atomic_output(path, overwrite=overwrite) as temporary:
        writer = gguf.GGUFWriter(temporary, arch)
        _add_header(writer, adapter, config["architectures"], shape, alpha)
        _add_tensor_infos(writer, adapter, names, torch_dtype, raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for module in adapter:
            A, B = _gguf_factors(adapter[module], alpha, permuted_heads(names[module], arch, shape))
            for side, tensor in (("lora_a", A), ("lora_b", B)):
                what = f"output {str(path)!r}, module {module!r}: {side}"
                writer.write_tensor_data(_to_numpy(tensor, torch_dtype, what))
        writer.close()
    return path


def _output_config(adapter: Adapter, base_config_path: str | Path | None, where: str) -> dict[str, Any]:
    """The base config the file is written for: the one a GGUF input recorded, unless `base_config_path` is given."""
    recorded = adapter.metadata.get("gguf_base_config")
    return recorded if recorded and base_config_path is None else base_config(adapter, base_config_path, where)


def _check_modules(adapter: Adapter, config: dict[str, Any], where: str) -> None:
    """Refuse what llama.cpp cannot apply: convolution LoRAs, and an lm_head LoRA on a base that ties lm_head."""
    kinds = {m: adapter.info(m).kind for m in adapter}
    odd = [m for m, kind in kinds.items() if kind not in ("linear", "embedding")]
    if odd:
        raise AdapterFormatError(
            f"{where}: GGUF adapters hold linear and embedding LoRAs; {some(odd)} are {kinds[odd[0]]}")
    if tie_word_embeddings(config) is True and "lm_head" in adapter:
        raise AdapterFormatError(f"{where}: the base ties lm_head to the input embeddings, so its GGUF has no output "
                                 f"tensor and llama.cpp cannot apply the adapter's lm_head LoRA (its converter refuses "
                                 f"it too); merge without lm_head, or use `lora-lego apply --untie`")


def _write_dtype(adapter: Adapter, dtype: str | torch.dtype | None, where: str) -> torch.dtype:
    """The torch dtype the tensors are written in (`output_dtype`), one of f32, f16 and bf16."""
    torch_dtype = output_dtype(adapter, dtype)
    if torch_dtype not in _WRITE_TYPES:
        raise AdapterFormatError(f"{where}: GGUF adapters are written as f32, f16 or bf16, not {torch_dtype}")
    return torch_dtype


def _add_header(writer, adapter: Adapter, architectures: list[str], shape: dict[str, int], alpha: int) -> None:
    """The key-values: a LoRA adapter of `alpha`, the base config reading back needs, and what `record` keeps."""
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    writer.add_string(CONFIG_KEY, json.dumps(recorded_config(architectures, shape), sort_keys=True))
    for key, value in record(adapter.metadata, PROVENANCE_KEY).items():  # provenance, base model, task type
        writer.add_string(key, value)


def _add_tensor_infos(writer, adapter: Adapter, names: dict[str, str], dtype: torch.dtype, raw) -> None:
    """Each module's lora_a (r, d_in), or (d_in, r) for an embedding, and lora_b (d_out, r), in `dtype`."""
    for module, info in ((m, adapter.info(m)) for m in adapter):
        d_out, d_in = info.shape
        a_shape = (d_in, info.rank) if info.kind == "embedding" else (info.rank, d_in)
        for suffix, tensor_shape in ((".lora_a", a_shape), (".lora_b", (d_out, info.rank))):
            count = tensor_shape[0] * tensor_shape[1]
            writer.add_tensor_info(f"{names[module]}.weight{suffix}", tensor_shape, _numpy_dtype(dtype),
                                   count * dtype.itemsize, raw_dtype=raw)


def _gguf_factors(factors: LoraFactors, alpha: int, heads: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_a, lora_b) as llama.cpp reads them for scale alpha / r: B times r / alpha, q/k rows permuted."""
    B = alpha_folded(factors.B, factors.rank, alpha)
    if heads is not None:
        B = permute_rows(B, heads)
    A = factors.A.T if factors.kind == "embedding" else factors.A
    return A, B


def _numpy_dtype(dtype: torch.dtype):
    import numpy as np  # a dependency of gguf; lora-lego's core does not need it

    return np.uint16 if dtype == torch.bfloat16 else {torch.float32: np.float32, torch.float16: np.float16}[dtype]


def _to_numpy(tensor: torch.Tensor, dtype: torch.dtype, what: str):
    import numpy as np

    tensor = cast_finite(tensor, dtype, what).contiguous()
    if dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()
