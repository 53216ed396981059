"""Calibration (optional extra `calibrate`; transformers loads the base model here, and only in `calibration/`):
run a base model on a few unlabeled prompts and accumulate, for every module an adapter targets, the Gram X^T X
of its inputs over the non-padding tokens.

How: one short trace pass records the order in which the modules run and which of them read the same
input tensor (q/k/v, gate/up), so that each shared input has one Gram. The groups are then split, in
that order, into chunks whose float64 accumulators fit `gram_memory`; each chunk is one pass over the
prompts that stops as soon as its last module has run. A small model is one pass; a 7B model keeps
about one layer's Grams (1.4 GB) at a time instead of all of them (44 GB). Each batch's product is
float32; the accumulation over batches is float64, and the result is saved as float32.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..defaults import GRAM_MEMORY, PROMPT_FORMATS
from ..errors import CalibrationError, LoraLegoWarning
from ..hub import resolve
from ..outputs import atomic_folder, check_output_path
from ..progress import progress as progress_of
from ..tensorfile import TensorWriter
from ..types import Adapter
from .grams import FILE_NAME, Calibration, header_metadata, load_calibration
from .passes import AppliedAdapter, accumulate, chunks_for, in_features, trace

EXTRA = 'pip install "lora-lego[calibrate]"'


LONG_PROMPT_CHARS = 10**6  # a prompt this long gets a warning before it is tokenized


def read_prompts(path: str | Path, *, max_prompts: int | None = None, format: str | None = None) -> list[str]:
    """Prompts from a JSONL file ({"text": ...} per line) or a text file (one prompt per line).

    `format` "jsonl" or "txt"; None: from the content (a file whose non-blank lines all are JSON objects with
    a "text" string is JSONL, whatever its name), else from the suffix (.jsonl / .json: JSONL, so that a bad
    line is reported), else text. Blank lines are skipped; `max_prompts` keeps the first ones. Raises
    CalibrationError naming the file and line when the file is missing, empty, or a line is not what is expected.
    """
    path = Path(path)
    if max_prompts is not None and (isinstance(max_prompts, bool) or max_prompts < 1):
        raise CalibrationError(f"max_prompts must be an integer >= 1; got {max_prompts!r}")
    if format is not None and format not in PROMPT_FORMATS:
        raise CalibrationError(f"prompts format must be one of {', '.join(PROMPT_FORMATS)}; got {format!r}")
    try:
        lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise CalibrationError(f"prompts file {str(path)!r}: cannot read it ({error})") from None
    if format is None:
        format = "jsonl" if (lines and all(_json_text(line) is not None for _, line in lines)) or path.suffix in (
            ".jsonl", ".json") else "txt"
    prompts = []
    for number, line in lines[:max_prompts]:
        text = _json_text(line) if format == "jsonl" else line
        if text is None:
            raise CalibrationError(f"prompts file {str(path)!r}, line {number}: {_jsonl_problem(line)}")
        prompts.append(text)
    if not prompts:
        raise CalibrationError(f"prompts file {str(path)!r} holds no prompts (expected one per line)")
    return prompts


def _jsonl_problem(line: str) -> str:
    try:
        item = json.loads(line)
    except (ValueError, RecursionError):
        item = None
    if isinstance(item, dict) and "text" in item:
        return "\"text\" must be a string"
    return f"expected a JSON object with a \"text\" string, got {line[:60]!r}"


def _json_text(line: str) -> str | None:
    """The "text" string of a JSON object line, or None."""
    try:
        item = json.loads(line)
    except (ValueError, RecursionError):
        return None
    text = item.get("text") if isinstance(item, dict) else None
    return text if isinstance(text, str) else None


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 of the prompt set as used (order included), recorded in the provenance."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def load_model(path: str | Path, *, device: str | torch.device | None = None, device_map: str | None = None,
               quiet: bool = False):
    """(model, tokenizer) of a local transformers causal-LM folder, in its own dtype, in eval mode.

    `quiet` turns transformers' progress bars off (for the CLI's -q; it is a process-wide setting)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging
    except ImportError:
        raise CalibrationError(f"calibration needs transformers ({EXTRA})") from None
    if quiet:
        transformers_logging.disable_progress_bar()
    source = resolve(path, kind="model", error=CalibrationError)  # a local folder, or a Hub id
    folder = source.path
    if not (folder / "config.json").is_file():
        raise CalibrationError(f"model {str(path)!r}: not a transformers model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        extra = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", **extra)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise CalibrationError(f"model {str(path)!r}: transformers cannot load it "
                               f"({' '.join(str(error).split())[:300]})") from None
    if source.hub is not None:  # named by its id, as transformers names a model it downloads
        model.config._name_or_path = source.name
    if device is not None and not device_map:
        model = model.to(device)
    return model.eval(), tokenizer


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's config and of the first 64 entries of every parameter (rounded to bf16),
    so that calibrations of the same weights match whatever dtype they were loaded in, and others do not."""
    digest = hashlib.blake2b(digest_size=8)
    config = getattr(model, "config", None)
    if config is not None:
        volatile = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "use_cache")
        digest.update(json.dumps({k: v for k, v in config.to_dict().items() if k not in volatile},
                                 sort_keys=True, default=str).encode())
    for name, parameter in model.named_parameters():
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        if parameter.device.type != "meta":
            sample = parameter.detach().flatten()[:64].to("cpu", torch.bfloat16).float()
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def linear_modules(model: torch.nn.Module) -> list[str]:
    """Paths of every linear layer (nn.Linear, transformers' Conv1D) of the model, in definition order."""
    return [name for name, module in model.named_modules() if in_features(module) is not None]


def calibrate(model: str | Path | torch.nn.Module, prompts: str | Path | Sequence[str], *, tokenizer=None,
              modules: Iterable[str] | None = None, max_prompts: int | None = None, max_length: int = 512,
              batch_size: int = 8, device: str | torch.device | None = None, adapter: Adapter | None = None,
              output: str | Path | None = None, overwrite: bool = False, gram_memory: int = GRAM_MEMORY,
              progress: bool = False, prompts_format: str | None = None,
              generated: dict | None = None) -> Calibration:
    """Input Grams of `modules` (default: every linear layer) of a base model on `prompts`.

    `model` is a local transformers causal-LM folder (loaded in its own dtype, moved to `device`), or a
    model already loaded (then give its `tokenizer`; e.g. one loaded with device_map="auto" for a model
    larger than one GPU: inputs go to its embedding's device, each Gram accumulates on its module's).
    `prompts` is a prompts file (see `read_prompts`; `prompts_format` "jsonl" / "txt" overrides its
    detection) or a list of strings, each the full prompt as the model sees it, truncated to `max_length`
    tokens (a LoraLegoWarning says how many were). `adapter` (optional) is applied during the passes
    (its deltas added to the modules' outputs), giving the inputs of the fine-tuned model (RegMean's
    original setting) instead of the base model's. With `output`, the Grams are written to that folder
    as they are computed (atomically) and the returned Calibration reads them back lazily; otherwise
    they are kept in memory. `generated` (optional): how the prompts were generated (see `generate`), recorded
    in the metadata.
    """
    if max_length < 1 or batch_size < 1 or gram_memory < 1:
        raise CalibrationError(f"need max_length, batch_size and gram_memory >= 1; got {max_length}, {batch_size}, "
                               f"{gram_memory}")
    if output is not None:
        check_output_path(output, [], overwrite=overwrite)
    if isinstance(prompts, (str, Path)):
        texts, source = read_prompts(prompts, max_prompts=max_prompts, format=prompts_format), str(prompts)
    else:
        texts, source = list(prompts)[:max_prompts], "<list>"
        if not texts or not all(isinstance(t, str) for t in texts):
            raise CalibrationError("prompts must be a prompts file or a non-empty list of strings")
    if isinstance(model, (str, Path)):
        model_name = str(model)
        model, tokenizer = load_model(model, device=device)
    else:
        model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        if tokenizer is None:
            raise CalibrationError("calibrate(model, ...) with a loaded model needs its tokenizer=")
    training = model.training
    try:
        model.eval()  # no dropout; the caller's mode is restored afterwards
        return _calibrate(model, model_name, tokenizer, texts, source, modules=modules, max_length=max_length,
                          batch_size=batch_size, adapter=adapter, output=output, overwrite=overwrite,
                          gram_memory=gram_memory, progress=progress, generated=generated)
    finally:
        model.train(training)


def _calibrate(model: torch.nn.Module, model_name: str, tokenizer, texts: list[str], source: str, *,
               modules: Iterable[str] | None, max_length: int, batch_size: int, adapter: Adapter | None,
               output: str | Path | None, overwrite: bool, gram_memory: int, progress: bool,
               generated: dict | None = None) -> Calibration:
    targets = target_modules(model, model_name, modules)
    batches = token_batches(tokenizer, texts, max_length, batch_size, source)
    tokens = sum(int(mask.sum()) for _, mask in batches)
    metadata = {"model": model_name, "model_fingerprint": model_fingerprint(model), "prompts": source,
                "prompts_sha256": prompts_digest(texts), "n_prompts": len(texts), "max_length": max_length,
                "activations": "base" if adapter is None else f"adapter {adapter.name}"}
    if generated:
        metadata["generated_prompts"] = generated
    with torch.no_grad(), AppliedAdapter(model, adapter, model_name):
        groups, repeated = trace(model, targets, batches[0])
        chunks = chunks_for(groups, targets, gram_memory)
        keys = {module: group[0] for group in groups for module in group}
        shapes = {group[0]: (in_features(targets[group[0]]),) * 2 for group in groups}
        bar = progress_of(sum(ids.shape[0] for ids, _ in batches) * len(chunks),
                          f"calibrate {Path(source).name}" + (f" ({len(chunks)} passes)" if len(chunks) > 1 else ""),
                          "prompt", enabled=progress)
        with bar:
            if output is None:
                grams: dict[str, torch.Tensor] = {}
                for chunk in chunks:
                    grams.update(accumulate(model, targets, chunk, batches, bar, early_exit=not repeated))
                return Calibration(grams, keys, tokens, metadata, name=f"calibration of {source}")
            with atomic_folder(output, overwrite=overwrite) as folder:
                entries = {key: (torch.float32, shape) for key, shape in shapes.items()}
                with TensorWriter(folder / FILE_NAME, entries, header_metadata(keys, tokens, metadata)) as writer:
                    for chunk in chunks:
                        for key, gram in accumulate(model, targets, chunk, batches, bar, early_exit=not repeated):
                            writer.write(key, gram)
    return load_calibration(output)


def target_modules(model: torch.nn.Module, model_name: str,
                   modules: Iterable[str] | None) -> dict[str, torch.nn.Module]:
    """Module path -> linear layer, for the requested paths (default: every linear layer), checked."""
    found = dict(model.named_modules())
    wanted = list(dict.fromkeys(modules)) if modules is not None else linear_modules(model)
    if not wanted:
        raise CalibrationError(f"model {model_name!r}: no module to calibrate")
    targets = {}
    for path in wanted:
        module = found.get(path)
        if module is None:
            raise CalibrationError(f"model {model_name!r} has no module {path!r} (an adapter targets it: is this "
                                   "its base model?)")
        if in_features(module) is None:
            raise CalibrationError(f"model {model_name!r}: module {path!r} is a {type(module).__name__}; calibrated "
                                   "merging supports linear layers only")
        targets[path] = module
    return targets


def token_batches(tokenizer, texts: list[str], max_length: int, batch_size: int,
             source: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches, right-padded, prompts sorted by length (less padding)."""
    def encode(text: str, length: int) -> list[int]:
        return tokenizer(text, truncation=True, max_length=length)["input_ids"]

    huge = [i for i, text in enumerate(texts) if len(text) > LONG_PROMPT_CHARS]
    if huge:  # the tokenizer reads a prompt whole before truncating it: say so before the wait
        warnings.warn(f"prompts {source!r}: {len(huge)} prompt(s) of more than {LONG_PROMPT_CHARS:,} characters "
                      f"(the longest {max(len(texts[i]) for i in huge):,}); only their first {max_length} tokens are "
                      "used, but tokenizing them whole takes a while", LoraLegoWarning, stacklevel=4)
    encoded = [encode(text, max_length + 1) for text in texts]  # one token more than kept: tells which are cut
    cut = [i for i, ids in enumerate(encoded) if len(ids) > max_length]
    for i in cut:  # as the tokenizer truncates (it may keep an end token)
        encoded[i] = encode(texts[i], max_length)
    if cut:
        warnings.warn(f"prompts {source!r}: {len(cut)} of {len(texts)} prompt(s) truncated to max_length "
                      f"{max_length} tokens", LoraLegoWarning, stacklevel=4)
    encoded = sorted((ids for ids in encoded if len(ids) > 0), key=len)
    if not encoded:
        raise CalibrationError(f"prompts {source!r}: every prompt tokenizes to nothing")
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, sequence in enumerate(chunk):
            ids[row, :len(sequence)] = torch.tensor(sequence)
            mask[row, :len(sequence)] = 1
        batches.append((ids, mask))
    return batches
