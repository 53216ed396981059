"""Calibration (optional extra `calibrate`; the only core file that imports transformers): run a base model
on a few unlabeled prompts and accumulate, for every module an adapter targets, the Gram X^T X of its
inputs over the non-padding tokens.

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
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .calibration import FILE_NAME, Calibration, header_metadata, load_calibration
from .errors import CalibrationError
from .tensorfile import TensorWriter
from .types import Adapter
from .writing import atomic_folder, check_output_path

GRAM_MEMORY = 3 * 2**29  # bytes of float64 accumulators per pass (1.5 GiB: one Llama-2-7B layer's 1.37)
_BLOCK = 1024  # columns of a Gram per float32 product (bounds the temporary)
EXTRA = 'pip install "lora-lego[calibrate]"'


class _Stop(Exception):
    """Raised by the hook of a pass's last module: the rest of the forward pass is not needed."""


def read_prompts(path: str | Path, *, max_prompts: int | None = None) -> list[str]:
    """Prompts from a .jsonl file ({"text": ...} per line) or a text file (one prompt per line).

    Blank lines are skipped; `max_prompts` keeps the first ones. Raises CalibrationError naming the file
    and line when the file is missing, empty, or a line is not what is expected.
    """
    path = Path(path)
    if max_prompts is not None and (isinstance(max_prompts, bool) or max_prompts < 1):
        raise CalibrationError(f"max_prompts must be an integer >= 1; got {max_prompts!r}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CalibrationError(f"prompts file {str(path)!r}: cannot read it ({error})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix in (".jsonl", ".json"):
            try:
                item = json.loads(line)
                text = item["text"]
            except (ValueError, KeyError, TypeError):
                raise CalibrationError(f"prompts file {str(path)!r}, line {number}: expected a JSON object with a "
                                       f"\"text\" string, got {line[:60]!r}") from None
            if not isinstance(text, str):
                raise CalibrationError(f"prompts file {str(path)!r}, line {number}: \"text\" must be a string")
        else:
            text = line
        prompts.append(text)
        if max_prompts is not None and len(prompts) >= max_prompts:
            break
    if not prompts:
        raise CalibrationError(f"prompts file {str(path)!r} holds no prompts (expected one per line)")
    return prompts


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
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CalibrationError(f"model {str(path)!r}: not a transformers model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        extra = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", **extra)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise CalibrationError(f"model {str(path)!r}: transformers cannot load it "
                               f"({' '.join(str(error).split())[:300]})") from None
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
    return [name for name, module in model.named_modules() if _in_features(module) is not None]


def _in_features(module: torch.nn.Module) -> int | None:
    """d_in of a linear layer (nn.Linear or transformers' Conv1D, whose weight is (d_in, d_out)); else None."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.shape[0]
    return None


def calibrate(model: str | Path | torch.nn.Module, prompts: str | Path | Sequence[str], *, tokenizer=None,
              modules: Iterable[str] | None = None, max_prompts: int | None = None, max_length: int = 512,
              batch_size: int = 8, device: str | torch.device | None = None, adapter: Adapter | None = None,
              output: str | Path | None = None, overwrite: bool = False, gram_memory: int = GRAM_MEMORY,
              progress: bool = False) -> Calibration:
    """Input Grams of `modules` (default: every linear layer) of a base model on `prompts`.

    `model` is a local transformers causal-LM folder (loaded in its own dtype, moved to `device`), or a
    model already loaded (then give its `tokenizer`; e.g. one loaded with device_map="auto" for a model
    larger than one GPU: inputs go to its embedding's device, each Gram accumulates on its module's).
    `prompts` is a prompts file (see `read_prompts`) or a list of strings, each the full prompt as the
    model sees it, truncated to `max_length` tokens. `adapter` (optional) is applied during the passes
    (its deltas added to the modules' outputs), giving the inputs of the fine-tuned model (RegMean's
    original setting) instead of the base model's. With `output`, the Grams are written to that folder
    as they are computed (atomically) and the returned Calibration reads them back lazily; otherwise
    they are kept in memory.
    """
    if max_length < 1 or batch_size < 1 or gram_memory < 1:
        raise CalibrationError(f"need max_length, batch_size and gram_memory >= 1; got {max_length}, {batch_size}, "
                               f"{gram_memory}")
    if output is not None:
        check_output_path(output, [], overwrite=overwrite)
    if isinstance(prompts, (str, Path)):
        texts, source = read_prompts(prompts, max_prompts=max_prompts), str(prompts)
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
                          gram_memory=gram_memory, progress=progress)
    finally:
        model.train(training)


def _calibrate(model: torch.nn.Module, model_name: str, tokenizer, texts: list[str], source: str, *,
               modules: Iterable[str] | None, max_length: int, batch_size: int, adapter: Adapter | None,
               output: str | Path | None, overwrite: bool, gram_memory: int, progress: bool) -> Calibration:
    targets = _targets(model, model_name, modules)
    batches = _batches(tokenizer, texts, max_length, batch_size, source)
    tokens = sum(int(mask.sum()) for _, mask in batches)
    metadata = {"model": model_name, "model_fingerprint": model_fingerprint(model), "prompts": source,
                "prompts_sha256": prompts_digest(texts), "n_prompts": len(texts), "max_length": max_length,
                "activations": "base" if adapter is None else f"adapter {adapter.name}"}
    with torch.no_grad(), _applied(model, adapter, model_name):
        groups, repeated = _trace(model, targets, batches[0])
        chunks = _chunks(groups, targets, gram_memory)
        keys = {module: group[0] for group in groups for module in group}
        shapes = {group[0]: (_in_features(targets[group[0]]),) * 2 for group in groups}
        bar = tqdm(total=sum(ids.shape[0] for ids, _ in batches) * len(chunks), unit="prompt",
                   desc=f"calibrate {Path(source).name}" + (f" ({len(chunks)} passes)" if len(chunks) > 1 else ""),
                   disable=None if progress else True, leave=False)
        with bar:
            if output is None:
                grams: dict[str, torch.Tensor] = {}
                for chunk in chunks:
                    grams.update(_accumulate(model, targets, chunk, batches, bar, early_exit=not repeated))
                return Calibration(grams, keys, tokens, metadata, name=f"calibration of {source}")
            with atomic_folder(output, overwrite=overwrite) as folder:
                entries = {key: (torch.float32, shape) for key, shape in shapes.items()}
                with TensorWriter(folder / FILE_NAME, entries, header_metadata(keys, tokens, metadata)) as writer:
                    for chunk in chunks:
                        for key, gram in _accumulate(model, targets, chunk, batches, bar, early_exit=not repeated):
                            writer.write(key, gram)
    return load_calibration(output)


def _targets(model: torch.nn.Module, model_name: str, modules: Iterable[str] | None) -> dict[str, torch.nn.Module]:
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
        if _in_features(module) is None:
            raise CalibrationError(f"model {model_name!r}: module {path!r} is a {type(module).__name__}; calibrated "
                                   "merging supports linear layers only")
        targets[path] = module
    return targets


def _batches(tokenizer, texts: list[str], max_length: int, batch_size: int,
             source: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches, right-padded, prompts sorted by length (less padding)."""
    encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
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


def _forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    device = model.get_input_embeddings().weight.device
    try:
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    except _Stop:
        pass


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _trace(model: torch.nn.Module, targets: dict[str, torch.nn.Module],
           batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[list[str]], bool]:
    """Groups of target modules that read the same input tensor, in the order they first run (one pass
    on a few tokens), and whether any module runs more than once per pass (then no early exit)."""
    calls: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps their ids unique during the pass

    def hook(name: str):
        return lambda module, args, kwargs: calls.append((name, _input(args, kwargs)))

    handles = [module.register_forward_pre_hook(hook(name), with_kwargs=True) for name, module in targets.items()]
    try:
        ids, mask = batch
        _forward(model, ids[:1, :8], mask[:1, :8])
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in targets if name not in {n for n, _ in calls}]
    if missing:
        raise CalibrationError(f"module {missing[0]!r} ({len(missing)} in all) did not run in the model's forward pass")
    groups: dict[int, list[str]] = {}
    for name, tensor in calls:
        group = groups.setdefault(id(tensor), [])
        if name not in group:
            group.append(name)
    first = {}
    for name, _ in calls:
        first.setdefault(name, len(first))
    repeated = len(calls) > len(first)
    if repeated:  # a module called twice (shared weights): keep it alone, so a group is one input
        ordered = [[name] for name in first]
    else:
        ordered = sorted(groups.values(), key=lambda group: first[group[0]])
    return ordered, repeated


def _chunks(groups: list[list[str]], targets: dict[str, torch.nn.Module], budget: int) -> list[list[list[str]]]:
    """Consecutive groups whose float64 Grams fit `budget` bytes together (a larger group is a chunk alone)."""
    chunks: list[list[list[str]]] = [[]]
    used = 0
    for group in groups:
        size = 8 * _in_features(targets[group[0]]) ** 2
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(group)
        used += size
    return chunks


def _accumulate(model: torch.nn.Module, targets: dict[str, torch.nn.Module], chunk: list[list[str]],
                batches: list[tuple[torch.Tensor, torch.Tensor]], bar, *,
                early_exit: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """One pass over the prompts, then (key, Gram) for each of the chunk's groups (float32, CPU; key: the
    group's first module), converted one at a time."""
    grams: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    last = chunk[-1][0]

    def hook(key: str):
        def accumulate(module, args, kwargs):
            x = _input(args, kwargs).detach()
            rows = x.reshape(-1, x.shape[-1])
            mask = state["mask"].to(rows.device).flatten().bool()
            if rows.shape[0] != mask.shape[0]:
                raise CalibrationError(f"module {key!r}: its input has {rows.shape[0]} rows for {mask.shape[0]} "
                                       "token positions (not one row per token; e.g. a mixture-of-experts layer)")
            rows = rows[mask].float()
            if key not in grams:
                grams[key] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
            for start in range(0, rows.shape[1], _BLOCK):  # float32 products, float64 sums, in column blocks
                grams[key][:, start:start + _BLOCK] += rows.T @ rows[:, start:start + _BLOCK]
            if early_exit and key == last:
                raise _Stop
        return accumulate

    handles = [targets[group[0]].register_forward_pre_hook(hook(group[0]), with_kwargs=True) for group in chunk]
    try:
        for ids, mask in batches:
            state["mask"] = mask
            _forward(model, ids, mask)
            bar.update(ids.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    while grams:  # float32 copies one at a time, each float64 accumulator freed as it goes
        key = next(iter(grams))
        yield key, grams.pop(key).float().cpu()


class _applied:
    """Context manager: the adapter's deltas added to its modules' outputs (forward hooks), removed on exit."""

    def __init__(self, model: torch.nn.Module, adapter: Adapter | None, model_name: str):
        self.model, self.adapter, self.model_name, self.handles = model, adapter, model_name, []

    def __enter__(self):
        if self.adapter is None:
            return self
        found = dict(self.model.named_modules())
        for path in self.adapter:
            module, factors = found.get(path), self.adapter[path]
            if module is None or _in_features(module) is None:
                raise CalibrationError(f"model {self.model_name!r} has no linear module {path!r} for adapter "
                                       f"{self.adapter.name!r} (is this its base model?)")
            if factors.kind != "linear" or _in_features(module) != factors.d_in:
                raise CalibrationError(f"adapter {self.adapter.name!r}, module {path!r}: a {factors.kind} delta of "
                                       f"shape {factors.shape} does not fit the model's {type(module).__name__} "
                                       f"with d_in {_in_features(module)}")
            self.handles.append(module.register_forward_hook(_delta_hook(factors)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def _delta_hook(factors):
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, args, output):
        x = args[0]
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (factors.A.to(x.device, x.dtype), factors.B.to(x.device, x.dtype))
        A, B = cache[key]
        return output + (x @ A.T) @ B.T
    return hook

