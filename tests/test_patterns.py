"""rank_pattern / alpha_pattern keys are untrusted regexes: PEFT's rule, matched with bounded work whatever the key
(counted in VM steps, not seconds), and the same answers as `re` for ordinary keys."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import lora_lego as ll
from lora_lego.errors import AdapterFormatError
from lora_lego.formats import patterns
from lora_lego.formats.patterns import MAX_NAME_CHARS, MAX_PROGRAM, PatternError, compile_key, matches, run

KEYS = ["q_proj", r"layers\.0\.mlp\..*_proj", "v_proj|k_proj", r"layers\.[0-9]+\.q", "a+", "(a|ab)*c", r"\bq",
        "^model.*", "q_proj$", "x{2,3}y", "(?i:Q)_proj", r".*\d", "(a*)*b", "model.layers.0.self_attn.q_proj",
        "layers.1.self_attn.q_proj", "mlp.*", ".*?proj", r"(?:down|up)_proj", r"[^.]+\.q_proj", r"\w+_proj\Z"]
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.0.mlp.down_proj", "q_proj",
           "a", "x.aaa", "ab.ababc", "xxy", "x.xxxy", "Q_proj", "m.q_proj\n", "aab", "qq_proj", "model.layers.10.q", ""]
# nested or ambiguous quantifiers: exponential (or high-degree polynomial) time on a backtracking engine
HOSTILE = ["(a+)+$", "(a|a)*$", "(a|aa)+b", "(a*)*b", "(.*a){20}", ".*.*.*.*.*.*x", r"(\w+\.?)+!"]


@pytest.mark.parametrize("key", KEYS)
def test_same_answers_as_peft_regex_rule(key):
    for module in MODULES:
        assert matches(key, module) == (re.match(rf"(.*\.)?({key})$", module) is not None), (key, module)


@pytest.mark.parametrize("key", HOSTILE)
def test_worst_patterns_take_linear_steps(key):
    compiled = compile_key(key)
    assert compiled.regex is None  # never on the backtracking engine
    name = "a" * (MAX_NAME_CHARS - 1) + "!"
    matched, steps = run(compiled.code, name)
    assert matched == (re.match(rf"(.*\.)?({key})$", "a" * 12 + "!") is not None)  # same answer on a short name
    assert len(compiled.code) <= MAX_PROGRAM
    assert steps <= 2 * (len(name) + 1) * len(compiled.code)
    # measured: (a+)+$ takes 18986 steps for 1000 characters (program of 18); re needs ~2**1000


def test_keys_without_repeats_run_on_re_and_refused_shapes_name_the_reason():
    assert compile_key("model.layers.0.self_attn.q_proj").regex is not None
    for key, reason in [(r"(a)\1", "backreference"), ("(?=a)a", "lookaround"), ("(x{100}){100}", "more than"),
                        ("a" * 1001, "characters long"), ("(", "not a regular expression"), ("a++", "possessive")]:
        with pytest.raises(PatternError, match=reason):
            compile_key(key)
    with pytest.raises(PatternError, match="module name of 1001 characters"):
        matches("(a+)+", "a" * 1001)


def _hostile_adapter(folder, key):
    """A PEFT folder whose module name is a long run of 'a' and whose alpha_pattern holds `key`."""
    module = "a" * 60 + "b"
    folder.mkdir()
    save_file({f"base_model.model.{module}.lora_A.weight": torch.ones(2, 4),
               f"base_model.model.{module}.lora_B.weight": torch.ones(4, 2)}, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "alpha_pattern": {key: 4}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder, module


def test_a_hostile_pattern_loads_with_counted_steps(tmp_path, monkeypatch):
    steps = []
    original = patterns.run
    monkeypatch.setattr(patterns, "run", lambda code, text: steps.append(original(code, text)) or steps[-1])
    folder, module = _hostile_adapter(tmp_path / "a", "(a+)+$")  # re: 2**60 tries on this name
    adapter = ll.load_adapter(folder)
    assert torch.allclose(adapter.modules[module].delta(), torch.ones(4, 4) * 2)  # no match: alpha 2, r 2
    assert steps and all(n <= 2 * 62 * MAX_PROGRAM for _, n in steps)


def test_a_refused_pattern_is_an_adapter_format_error(tmp_path):
    folder, _ = _hostile_adapter(tmp_path / "a", r"(a)\1")
    with pytest.raises(AdapterFormatError, match=r"alpha_pattern key '\(a\)\\\\1' uses a backreference"):
        ll.load_adapter(folder)
