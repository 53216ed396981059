"""Fast start (issue 32, item 5): `import lora_lego`, the CLI's parser, `--help` and `methods` import no torch,
transformers, peft, safetensors or diffusers, and the lazy public API still works. What is imported is checked in
a fresh interpreter; how long it takes is measured by benchmarks/startup.py, not here."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import lora_lego as ll
from lora_lego import defaults
from lora_lego.methods.source import builtin_specs, specs_in

HEAVY = ("torch", "transformers", "peft", "safetensors", "diffusers", "numpy", "huggingface_hub", "yaml")


def _imported_after(code: str) -> list[str]:
    """The heavy top-level packages that a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    return [name for name in json.loads(done.stdout.splitlines()[-1]) if name in HEAVY]


def test_import_lora_lego_imports_nothing_heavy():
    assert _imported_after("import lora_lego") == []


def test_every_public_name_loads_neither_transformers_nor_peft():
    """Touching the whole public API (`lora_lego.merge`, `lora_lego.load_adapter`, ...) loads the library's own
    modules and torch, never the optional extras: those load only when a function needs them (issue 31)."""
    code = "import lora_lego\nfor name in lora_lego.__all__:\n    getattr(lora_lego, name)"
    loaded = _imported_after(code)
    assert "torch" in loaded  # the names were really resolved
    assert not {"transformers", "peft", "diffusers", "huggingface_hub", "yaml"} & set(loaded), loaded


def test_the_parser_and_every_help_import_nothing_heavy():
    from lora_lego.cli import build_parser

    commands = list(build_parser()._subparsers._group_actions[0].choices)
    code = ("import contextlib, io\nfrom lora_lego.cli import main\n"
            f"for argv in [['--help'], *[[c, '--help'] for c in {commands!r}]]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)")
    assert _imported_after(code) == []


def test_methods_and_version_import_nothing_heavy():
    code = ("import contextlib, io\nfrom lora_lego.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    assert main(['methods']) == 0\n"
            "    with contextlib.suppress(SystemExit):\n        main(['--version'])\n"
            "assert 'regmean_pp' in out.getvalue() and 'lora-lego ' in out.getvalue()")
    assert _imported_after(code) == []


def test_the_lazy_api_works_in_a_fresh_interpreter():
    code = """
import lora_lego as ll
import lora_lego.cli, lora_lego.merge  # a submodule named like an API function
import lora_lego.calibration.score, lora_lego.calibration.calibrate
from lora_lego import merge, prune, Adapter, LoraFactors
import torch
assert ll.merge is merge and merge.__module__ == "lora_lego.merge" and ll.prune is prune
assert ll.score.__module__ == "lora_lego.calibration.auto"
assert ll.calibrate.__module__ == "lora_lego.calibration.calibrate"
assert set(ll.__all__) <= set(dir(ll)) and all(hasattr(ll, name) for name in ll.__all__)
g = torch.Generator().manual_seed(0)
a = Adapter({"m": LoraFactors(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g))})
b = Adapter({"m": LoraFactors(torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g))})
merged = ll.merge([a, b], "concat")
assert torch.allclose(merged["m"].delta(), a["m"].delta() + b["m"].delta(), atol=1e-5)
assert ll.prune(a, rank=1)["m"].rank == 1 and "ties" in ll.available_methods()
assert isinstance(ll.__version__, str) and ll.__version__
try:
    ll.no_such_name
except AttributeError as error:
    assert "no_such_name" in str(error)
else:
    raise AssertionError("ll.no_such_name did not raise")
"""
    assert "torch" in _imported_after(code)  # and every assertion above held


def test_a_submodule_imported_later_keeps_the_api_name():
    import importlib

    module = importlib.import_module("lora_lego.merge")
    assert ll.merge is module.merge and callable(ll.merge)


def test_the_package_takes_attributes_after_its_types_submodule_is_loaded():
    """`lora_lego.types` (loaded by now) must not stand in for the stdlib `types` inside the package: binding a
    submodule named like an API function, or a user's own assignment, goes through the same hook."""
    code = ("import warnings\nwarnings.simplefilter('error', ImportWarning)\nimport lora_lego, lora_lego.types\n"
            "import lora_lego.merge\nlora_lego.calibrate = 'mine'\nassert lora_lego.calibrate == 'mine'\n"
            "assert callable(lora_lego.merge)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_method_specs_read_from_source_equal_the_imported_registry():
    """`lora-lego methods` lists what `methods.source` reads; it must be what importing the methods registers."""
    from lora_lego.calibration.regmean_pp import SPEC

    read = builtin_specs()
    assert sorted(read) == ll.available_methods()
    for name, spec in read.items():
        assert spec == dataclasses.replace(ll.get_method(name), fn=None), name
    assert specs_in("calibration.regmean_pp") == {"regmean_pp": dataclasses.replace(SPEC, fn=None)}


def test_light_defaults_are_those_the_library_uses():
    from lora_lego.formats import available_formats

    assert list(defaults.FORMATS) == available_formats()

