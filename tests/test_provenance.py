"""Provenance you can read: every format records how lora-lego made an adapter and gives it back when read,
`inspect` shows it for every format, conversions keep the base model and task type (PEFT -> GGUF -> PEFT,
PEFT -> diffusers file -> PEFT), and every PEFT folder written gets its model card."""

from __future__ import annotations

import json

import pytest

import lora_lego as ll
from conftest import make_peft_adapter, tiny_llama_folder
from lora_lego.cli import main
from lora_lego.errors import LoraLegoWarning
from lora_lego.formats.record import recorded

pytestmark = pytest.mark.filterwarnings("ignore:.*saved base-layer weight")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pytest.importorskip("transformers")
    return tiny_llama_folder(tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A merged PEFT folder (ties of two PEFT adapters of base "tiny-base", task CAUSAL_LM)."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("merged")
    inputs = [make_peft_adapter(root, name, base_name="tiny-base", task_type="CAUSAL_LM") for name in ("x", "y")]
    out = root / "m"
    assert main(["merge", *map(str, inputs), "-o", str(out), "--method", "ties", "--rank", "3",
                 "--weights", "1", "0.5", "--seed", "7", "-q"]) == 0
    return out, inputs


def test_a_peft_output_gives_its_provenance_back(merged):
    out, inputs = merged
    adapter = ll.load_adapter(out)
    provenance = adapter.metadata["provenance"]
    assert provenance["method"] == "ties" and provenance["seed"] == 7 and provenance["params"]["rank"] == 3
    assert provenance["sources"] == [str(p) for p in inputs] and provenance["weights"] == [1.0, 0.5]
    assert adapter.metadata["base_model_name_or_path"] == "tiny-base" and adapter.metadata["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize("suffix, fmt", [("c.gguf", "gguf"), ("c.safetensors", "diffusers"), ("c_peft", "peft")])
def test_every_conversion_keeps_provenance_base_model_and_task(merged, base, tmp_path, capsys, suffix, fmt):
    pytest.importorskip("gguf")
    out, _ = merged
    converted = tmp_path / suffix
    assert main(["convert", str(out), "-o", str(converted), "--base-config", str(base)]) == 0
    capsys.readouterr()
    again = ll.load_adapter(converted)
    assert again.metadata["format"] == fmt
    assert again.metadata["provenance"] == ll.load_adapter(out).metadata["provenance"]
    assert again.metadata["base_model_name_or_path"] == "tiny-base" and again.metadata["task_type"] == "CAUSAL_LM"
    back = tmp_path / "back"  # ... and back to a PEFT folder: config and card as the original's
    assert main(["convert", str(converted), "-o", str(back)]) == 0
    config = json.loads((back / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-base" and config["task_type"] == "CAUSAL_LM"
    card = (back / "README.md").read_text()
    assert 'base_model: "tiny-base"' in card and "method `ties`" in card and "seed 7" in card
    assert main(["inspect", str(converted)]) == 0
    shown = capsys.readouterr().out
    assert "made by: lora-lego" in shown and "method ties (rank=3), seed 7" in shown, shown
    assert "base model: tiny-base   task: CAUSAL_LM" in shown and "(weight 0.5)" in shown


def test_peft_gguf_peft_round_trip_of_an_adapter_peft_made(base, tmp_path):
    pytest.importorskip("gguf")
    folder = make_peft_adapter(tmp_path, "a", base_name="org/base-model", task_type="CAUSAL_LM")
    gguf_file = ll.save_adapter(ll.load_adapter(folder), tmp_path / "a.gguf", base_config=base)
    read = ll.load_adapter(gguf_file)
    assert read.metadata["base_model_name_or_path"] == "org/base-model" and read.metadata["task_type"] == "CAUSAL_LM"
    assert "provenance" not in read.metadata  # PEFT made it: nothing to invent
    back = ll.save_adapter(read, tmp_path / "back")
    config = json.loads((back / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base-model" and config["task_type"] == "CAUSAL_LM"
    assert (back / "README.md").is_file()


def test_inspect_says_when_nothing_is_recorded(tmp_path, capsys):
    folder = make_peft_adapter(tmp_path, "a")
    assert main(["inspect", str(folder)]) == 0
    assert "provenance: none recorded" in capsys.readouterr().out


def test_a_damaged_record_is_ignored_with_a_warning():
    with pytest.warns(LoraLegoWarning, match="not a JSON object"):
        assert recorded({"lora_lego": "{not json", "lora_lego.task_type": "CAUSAL_LM"}, "x") == {
            "task_type": "CAUSAL_LM"}
    assert recorded({"lora_lego.base_model_name_or_path": 3}, "x") == {}  # not a string: left out
