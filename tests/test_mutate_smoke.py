"""scripts/mutate: the mutants it writes are the ones it names (the run itself is a script)."""

from __future__ import annotations

import ast
import importlib.util
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
