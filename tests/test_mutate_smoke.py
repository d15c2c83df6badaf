"""scripts/mutate: the mutants it writes are the ones it names (the run itself is a script)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _mutate_module():
    spec = importlib.util.spec_from_file_location("mutate", REPO / "scripts" / "mutate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutate"] = module
    spec.loader.exec_module(module)
    return module


SOURCE = '''
def late(age, limit):
    """A docstring is never mutated."""
    if age > limit and limit != 0:
        return True
    return not False
'''


def test_each_point_yields_the_mutant_it_names(tmp_path: Path) -> None:
    mutate = _mutate_module()
    module = REPO / "agent" / "admission.py"  # any module: only the indexing is shared
    found = mutate.points(module)
    assert found and all(p.module == "agent/admission.py" for p in found)
    tree = ast.parse(SOURCE)
    skip = mutate._skipped(tree)
    named = {}
    for index, node in enumerate(ast.walk(tree)):
        if id(node) not in skip and (m := mutate._mutate(node)) is not None:
            named[m[1]] = index
    assert set(named) >= {"> -> >=", "!= -> ==", "and -> or", "return x -> return None", "not x -> x",
                          "0 -> 1", "False -> True"}
    point = mutate.Point("x.py", named["> -> >="], 4, "> -> >=")
    assert "age >= limit and limit != 0" in mutate.mutant_source(SOURCE, point)
    point = mutate.Point("x.py", named["and -> or"], 4, "and -> or")
    assert "age > limit or limit != 0" in mutate.mutant_source(SOURCE, point)
    point = mutate.Point("x.py", named["not x -> x"], 6, "not x -> x")
    assert mutate.mutant_source(SOURCE, point).rstrip().endswith("return False")
    assert "docstring" in mutate.mutant_source(SOURCE, point), "the docstring is kept, not mutated"


STUB = '''
from typing import Protocol


class Link(Protocol):
    def publish(self, topic: str, *, retain: bool = False, qos: int = 1) -> object: ...

    def close(self, now: bool = True) -> None:
        """Only a docstring: a stub too."""


def real(retain: bool = False) -> bool:
    return retain
'''


def test_the_defaults_of_a_stub_are_no_points() -> None:
    mutate = _mutate_module()
    tree = ast.parse(STUB)
    skip = mutate._skipped(tree)
    lines = {node.lineno for node in ast.walk(tree)
             if id(node) not in skip and hasattr(node, "lineno") and mutate._mutate(node) is not None}
    assert lines == {12, 13}, "only the function with a body has points"


def test_a_rerun_takes_the_survivors_and_says_when_they_are_gone() -> None:
    mutate = _mutate_module()
    a, b, c = (mutate.Point("agent/x.py", i, i, "< -> <=") for i in (1, 2, 3))
    other = mutate.Point("agent/y.py", 9, 9, "< -> <=")
    assert mutate.survivors_of([a, b, c], {b, other}) == ([b], 0), "another module's survivors are not asked for"
    gone = mutate.Point("agent/x.py", 4, 4, "and -> or")
    assert mutate.survivors_of([a, b, c], {b, gone}) == ([b], 1)


def test_tests_that_fail_without_a_mutant_stop_the_run() -> None:
    mutate = _mutate_module()

    def ran(code: int, out: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.CompletedProcess(["pytest"], code, out, b"")
    problem = mutate.unfit(ran(1, b"FAILED tests/test_x.py::test_x\n1 failed"))
    assert problem and "fail without any mutant" in problem and "exit 1" in problem and "1 failed" in problem
    assert "exit 5" in (mutate.unfit(ran(5)) or ""), "no tests collected: nothing to judge a mutant by"
    assert mutate.unfit(ran(0)) is None
