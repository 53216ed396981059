"""llama.cpp itself loads the GGUF adapters lora-lego writes and computes the logits of transformers + PEFT.

    python benchmarks/consumers/llama_cpp_check.py [--out llama_cpp.json] [--work DIR] [--threads 2]

Needs llama-cpp-python (built from source: see docs/consumers.md), gguf, transformers and peft; runs offline
in about a minute. Steps:
1. A tiny random Llama (tiny.py) is saved as a transformers folder and written as a GGUF base model by the
   small writer below (float32; q/k rows permuted as llama.cpp's converter does), independent of lora-lego.
2. PEFT makes LoRA adapters on it; lora-lego writes them as GGUF: `convert` of one adapter (mixed ranks,
   per-module alpha, rsLoRA: the scale folding), one on embed_tokens and lm_head, in f16, and `merge -o
   x.gguf` of two adapters. A control writes the merge with the q/k permutation switched off.
3. llama.cpp (through llama-cpp-python) gives the logits of every prompt token with and without each
   adapter, compared with transformers (+ PEFT on the same adapter folder): the largest difference, and the
   correlation and relative error of the adapter's effect (adapted minus base logits).
Prints a table and writes the figures as JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny

# the checks' thresholds: what "gives the logits of transformers + PEFT" means here (float32 on both sides)
MAX_BASE_DIFF = 1e-3  # largest |logit difference| of the base model
MIN_EFFECT_CORR = 0.999  # correlation of the adapter's effect on the logits
MAX_EFFECT_REL_ERR = 0.01
MAX_CONTROL_CORR = 0.9  # the unpermuted control must be visibly wrong, or the check proves nothing


def permute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for attn_q / attn_k: within each head, the two rotary halves interleaved.

    `weight` is of shape (heads * head_dim, d_in); row h*hd + 2i + j of the result is row h*hd + j*hd/2 + i.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def write_base_gguf(base: Path, path: Path) -> Path:
    """The transformers Llama in `base` as a llama.cpp GGUF model (float32, no tokenizer: 'none' vocab)."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((base / "config.json").read_text())
    layers, heads, kv_heads = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("lora-lego tiny llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("none")  # token ids go in directly; llama.cpp adds dummy tokens
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    for key, tensor in load_file(base / "model.safetensors").items():
        name = names.get_name(key, try_suffixes=(".weight",))
        if name is None:
            raise ValueError(f"no GGUF name for {key}")
        if name.endswith("attn_q.weight"):
            tensor = permute_qk(tensor, heads)
        elif name.endswith("attn_k.weight"):
            tensor = permute_qk(tensor, kv_heads)
        writer.add_tensor(name, tensor.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def lora_lego(*args: str) -> None:
    """Run the lora-lego command line in this process; raise on a non-zero exit."""
    from lora_lego.cli import main

    code = main(list(args))
    if code:
        raise RuntimeError(f"lora-lego {' '.join(args)} exited {code}")


@contextlib.contextmanager
def unpermuted_gguf():
    """lora-lego's GGUF writer with the Llama q/k row permutation switched off (the negative control)."""
    from lora_lego.formats import gguf as gguf_format

    saved = dict(gguf_format.PERMUTED)
    gguf_format.PERMUTED["llama"] = False
    try:
        yield
    finally:
        gguf_format.PERMUTED.clear()
        gguf_format.PERMUTED.update(saved)


def make_cases(base: Path, work: Path) -> list[dict]:
    """PEFT adapters on `base` and the GGUF files lora-lego writes from them.

    Each case: {"name", "gguf": file for llama.cpp, "peft": folder with the same weights for the reference,
    "control": True when llama.cpp must NOT agree}.
    """
    a = tiny.make_adapter(base, work / "a", seed=1, rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 4},
                          use_rslora=True)
    b = tiny.make_adapter(base, work / "b", seed=2, r=4, lora_alpha=8)
    embed = tiny.make_adapter(base, work / "embed", seed=3, r=4, lora_alpha=4,
                              target_modules=["embed_tokens", "lm_head", "q_proj", "k_proj"])
    lora_lego("convert", str(a), "-o", str(work / "a.gguf"))
    lora_lego("convert", str(a), "-o", str(work / "a_f16.gguf"), "--dtype", "fp16")
    lora_lego("convert", str(embed), "-o", str(work / "embed.gguf"))
    # the same merge twice (deterministic): once as GGUF for llama.cpp, once as PEFT for the reference
    lora_lego("merge", str(a), str(b), "--rank", "8", "-o", str(work / "merged.gguf"))
    lora_lego("merge", str(a), str(b), "--rank", "8", "-o", str(work / "merged"))
    with unpermuted_gguf():
        lora_lego("convert", str(work / "merged"), "-o", str(work / "merged_unpermuted.gguf"))
    return [
        {"name": "convert (mixed ranks, alpha_pattern, rslora)", "gguf": work / "a.gguf", "peft": a},
        {"name": "convert --dtype fp16", "gguf": work / "a_f16.gguf", "peft": a},
        {"name": "convert (embed_tokens, lm_head, q, k)", "gguf": work / "embed.gguf", "peft": embed},
        {"name": "merge A B -o merged.gguf (ties, rank 8)", "gguf": work / "merged.gguf", "peft": work / "merged"},
        {"name": "control: merged, q/k rows not permuted", "gguf": work / "merged_unpermuted.gguf",
         "peft": work / "merged", "control": True},
    ]


class LlamaLog:
    """Collects llama.cpp's log lines (to read "loaded N tensors from lora file") instead of printing them."""

    def __init__(self):
        import llama_cpp

        self.lines: list[str] = []
        self._callback = llama_cpp.llama_log_callback(lambda level, text, data: self.lines.append(text.decode()))
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def loaded_tensors(self) -> int | None:
        found = re.findall(r"loaded (\d+) tensors from lora file", "".join(self.lines))
        return int(found[-1]) if found else None


def llama_cpp_logits(model: Path, adapter: Path | None, ids: list[list[int]], threads: int) -> torch.Tensor:
    """llama.cpp's logits of each prompt (float32 weights and KV cache), of shape (n, length, vocab)."""
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(model_path=str(model), lora_path=str(adapter) if adapter else None, n_ctx=128, n_batch=128,
                logits_all=True, n_threads=threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    rows = []
    for sequence in ids:
        llm.reset()
        llm.eval(sequence)
        rows.append(torch.from_numpy(llm.scores[: len(sequence)].copy()))
    llm.close()
    return torch.stack(rows).double()


def check_case(case: dict, model: Path, base: Path, ids: list[list[int]], base_logits: dict, log: LlamaLog,
               threads: int) -> dict:
    """The figures of one adapter: tensors llama.cpp loaded, logit difference, effect agreement, verdict."""
    start = time.perf_counter()
    consumer = llama_cpp_logits(model, case["gguf"], ids, threads)
    reference = tiny.reference_logits(base, case["peft"], ids)
    row = {"case": case["name"], "tensors": log.loaded_tensors(), **tiny.agreement(consumer, reference),
           **tiny.effect_agreement(base_logits["llama.cpp"], consumer, base_logits["transformers"], reference)}
    if case.get("control"):
        row["ok"] = row["effect_corr"] < MAX_CONTROL_CORR
    else:
        row["ok"] = row["effect_corr"] >= MIN_EFFECT_CORR and row["effect_rel_err"] <= MAX_EFFECT_REL_ERR
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def run(work: Path, threads: int = 2) -> dict:
    """Build everything under `work`, run llama.cpp on every case; returns the JSON-able results."""
    import llama_cpp

    log = LlamaLog()
    base = tiny.make_base(work / "base")
    model = write_base_gguf(base, work / "base.gguf")
    ids = tiny.prompts()
    base_logits = {"llama.cpp": llama_cpp_logits(model, None, ids, threads),
                   "transformers": tiny.reference_logits(base, None, ids)}
    base_row = {"case": "base model (no adapter)",
                **tiny.agreement(base_logits["llama.cpp"], base_logits["transformers"])}
    base_row["ok"] = base_row["max_abs_diff"] <= MAX_BASE_DIFF
    cases = make_cases(base, work)
    rows = [base_row] + [check_case(case, model, base, ids, base_logits, log, threads) for case in cases]
    return {"consumer": "llama.cpp via llama-cpp-python", "llama_cpp_python": llama_cpp.__version__,
            "model": tiny.LLAMA, "prompts": [len(ids), len(ids[0])], "thresholds": {
                "max_base_diff": MAX_BASE_DIFF, "min_effect_corr": MIN_EFFECT_CORR,
                "max_effect_rel_err": MAX_EFFECT_REL_ERR, "max_control_corr": MAX_CONTROL_CORR},
            "rows": rows, "ok": all(row["ok"] for row in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--work", type=Path, help="build the models and adapters here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        results = run(work, args.threads)
    tiny.print_table(results["rows"], ["case", "tensors", "max_abs_diff", "max_abs_ref", "effect_corr",
                                       "effect_rel_err", "effect_max_abs", "ok"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
