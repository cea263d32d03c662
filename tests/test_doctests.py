"""The examples in torchcurv's docstrings run and print what they claim.

Every module of the package is imported and its docstrings' ``>>>`` examples are run
(doctest); the operators' examples check each matrix against its closed form, so a
docstring that no longer describes the code fails here. Modules whose optional
dependency is missing are skipped, as their tests are.
"""

import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest
import torch

import torchcurv


def _has_prompt(name: str) -> bool:
    """Whether the module's source holds a ``>>>`` prompt (read, not imported)."""
    spec = importlib.util.find_spec(name)
    origin = spec.origin if spec is not None else None
    return origin is not None and ">>>" in Path(origin).read_text(encoding="utf-8")


# Only modules whose source has a prompt: the others would be reported as skips.
# __main__ runs the command line on import.
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(torchcurv.__path__, prefix="torchcurv.")
    if m.name != "torchcurv.__main__" and _has_prompt(m.name)
)


def _examples(name: str) -> list[doctest.DocTest]:
    try:
        module = importlib.import_module(name)
    except ImportError as e:  # MissingExtraError is an ImportError too
        pytest.skip(f"{name} needs an optional package: {e}")
    return [t for t in doctest.DocTestFinder().find(module) if t.examples]


def test_every_public_operator_carries_a_checked_example():
    for name in ("HessianOperator", "GGNOperator", "EmpiricalFisherOperator",
                 "MCFisherOperator", "MatrixOperator"):
        tests = doctest.DocTestFinder().find(getattr(torchcurv, name))
        assert any(t.examples for t in tests), f"{name}'s docstring has no >>> example"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    tests = _examples(name)
    assert tests, f"{name}'s source has '>>>' but doctest finds no example in it"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny examples: threads only add synchronisation
    try:
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        for test in tests:
            runner.run(test)
        assert runner.failures == 0, f"{runner.failures} failing example(s) in {name}"
    finally:
        torch.set_num_threads(threads)
