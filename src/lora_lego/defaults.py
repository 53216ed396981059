"""Defaults and choices that the library and the command line share, stdlib only: the CLI's parser is built
from them without importing torch (`lora-lego --help` in ~0.1 s). The modules that use them import them here."""

# calibrate
GRAM_MEMORY = 3 * 2**29  # bytes of float64 accumulators per pass (1.5 GiB: one Llama-2-7B layer's 1.37)
PROMPT_FORMATS = ("jsonl", "txt")

# generate
STARTS = ("bos", "chat", "seeds")
DEFAULT_START = "bos"  # measured: docs/results.md (k), dev tasks (bos 0.573, chat 0.570, seeds 0.555)

# score
POSITIONS = ("last", "all")

# formats: the built-in formats' names, in the order `formats` registers them (a test checks that they agree;
# the formats package itself imports torch)
FORMATS = ("peft", "kohya", "diffusers", "gguf", "comfyui")
