from typing import Literal

import pytest

from lora_lego.errors import MethodError
from lora_lego.methods import available_methods, get_method
from lora_lego.methods.registry import allowed_values, parameter_docs, register, shown_value


def test_builtin_methods_are_listed():
    assert {"concat", "lego"} <= set(available_methods())


def test_lego_parameters_come_from_the_signature():
    spec = get_method("lego")
    expected = {"n_clusters", "n_init", "max_iter", "tol", "param_norm", "output_reweight", "features"}
    assert expected <= set(spec.parameters)
    assert "generator" not in spec.parameters
    assert spec.paper and "2409.16167" in spec.paper
    assert spec.summary


@pytest.mark.parametrize("given, expected", [
    ({"rank": "8"}, {"n_clusters": 8}),
    ({"n_clusters": 8.0}, {"n_clusters": 8}),
    ({"n_clusters": "none"}, {"n_clusters": None}),
    ({"n_init": "3", "tol": "1e-3"}, {"n_init": 3, "tol": 1e-3}),
    ({"param_norm": "L2"}, {"param_norm": "l2"}),
    ({"output_reweight": "false"}, {"output_reweight": False}),
    ({"output_reweight": True}, {"output_reweight": True}),
])
def test_parameters_are_coerced_from_strings(given, expected):
    assert get_method("lego").resolve(given) == expected


@pytest.mark.parametrize("given, message", [
    ({"rank": "2.5"}, "integer"),
    ({"n_init": True}, "integer"),
    ({"tol": "abc"}, "finite number"),
    ({"tol": float("nan")}, "finite number"),
    ({"param_norm": "l1"}, "one of"),
    ({"output_reweight": "maybe"}, "true or false"),
    ({"density": 0.5}, "no parameter 'density'"),
    ({"rank": 4, "n_clusters": 4}, "given twice"),
])
def test_bad_parameters_raise_method_error(given, message):
    with pytest.raises(MethodError, match=message):
        get_method("lego").resolve(given)


def test_duplicate_registration_is_refused():
    with pytest.raises(KeyError, match="already registered"):
        register("concat")(lambda factors, weights, *, generator: factors[0])


@pytest.mark.parametrize("name", available_methods())
def test_every_parameter_is_documented_in_the_docstring(name):
    spec = get_method(name)
    assert set(spec.docs) == set(spec.parameters), "add a `Parameters:` section with one line per parameter"
    assert all(meaning.strip() for meaning in spec.docs.values())


def test_parameter_docs_reads_the_section_with_continued_lines():
    doc = ("Summary.\n\nProse about `density`.\n\nParameters:\n    density: fraction kept,\n"
           "        in (0, 1]\n    sign: total or frequency\n\nAfter the section: ignored.")
    assert parameter_docs(doc) == {"density": "fraction kept, in (0, 1]", "sign": "total or frequency"}
    assert parameter_docs("No section here.") == {}


@pytest.mark.parametrize("annotation, words", [
    (Literal["inf", "l2", "off"], "inf | l2 | off"), (bool, "true | false"), (int, "integer"), (float, "number"),
    (int | None, "integer or none"), (float | None, "number or none"), (str, "text"),
])
def test_allowed_values_in_words(annotation, words):
    assert allowed_values(annotation) == words


def test_defaults_are_shown_as_the_cli_takes_them():
    assert [shown_value(v) for v in (None, True, False, 0.5, "inf")] == ["none", "true", "false", "0.5", "inf"]
