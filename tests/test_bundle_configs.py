"""The bundle configs hold settings, not programs: at most 25 ``$``-expressions per config file, none longer than
120 characters, no ``lambda``. The logic lives in tested factories (``*.factories``)."""

import ast
import json
import re

import pytest
import yaml

from conftest import ROOT

MAX_EXPRESSIONS = 25
MAX_LENGTH = 120
CONFIG_FILES = sorted(p for p in (ROOT / "bundle").glob("*/configs/*") if p.suffix in (".yaml", ".yml", ".json"))


def expressions(value):
    """The ``$``-expression strings anywhere in a parsed config."""
    if isinstance(value, dict):
        for v in value.values():
            yield from expressions(v)
    elif isinstance(value, list):
        for v in value:
            yield from expressions(v)
    elif isinstance(value, str) and value.startswith("$"):
        yield value


def has_lambda(expression):
    """Whether ``expression`` (``$`` dropped, ``@id`` references as names) defines a ``lambda``."""
    code = re.sub(r"@[\w#]+", "_ref", expression[1:])
    return any(isinstance(node, ast.Lambda) for node in ast.walk(ast.parse(code)))


def name(path):
    return str(path.relative_to(ROOT / "bundle"))


def load(path):
    return json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", [pytest.param(p, id=name(p)) for p in CONFIG_FILES])
def test_config_has_few_short_expressions_and_no_lambda(path):
    found = list(expressions(load(path)))
    assert len(found) <= MAX_EXPRESSIONS, f"{name(path)}: {len(found)} $-expressions (at most {MAX_EXPRESSIONS})"
    long = [e for e in found if len(e) > MAX_LENGTH]
    assert not long, f"{name(path)}: expressions longer than {MAX_LENGTH} characters: {long}"
    assert not [e for e in found if has_lambda(e)], f"{name(path)}: lambda in a $-expression"


def test_the_checks_see_expressions_lengths_and_lambdas():
    config = {"a": "$@x + 1", "b": ["plain", {"c": "$lambda out: out[0]", "d": "$'lambda now' + @y"}]}
    assert list(expressions(config)) == ["$@x + 1", "$lambda out: out[0]", "$'lambda now' + @y"]
    assert [has_lambda(e) for e in expressions(config)] == [False, True, False]
    assert has_lambda("$import os") is False
    assert len(CONFIG_FILES) >= 15 and all(p.is_file() for p in CONFIG_FILES)
