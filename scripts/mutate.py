"""A small mutation run: does the suite notice when a module's logic is changed?

For every mutation point in the module(s) named — a comparison flipped (< to <=, == to !=),
a boolean operator swapped (and/or), a `not` dropped, + to -, a small integer constant
moved by one, True/False swapped, a `return <expr>` that returns None — it writes the
mutant into a private copy of the repository (so the daemons and commands the broker tests
start run the mutant too), runs the chosen tests there with `-x`, and records whether they
failed (killed) or passed (survived). Survivors are printed with their line, for a person
to read: each is either a missing test or an equivalent mutant (a change nothing can see).

    scripts/mutate agent/dispatch.py -- tests/test_dispatch.py
    scripts/mutate agent/ledger.py agent/gate.py --limit 40 -- tests/test_ledger.py tests/test_servicemodel.py
    scripts/mutate agent/bus.py --lines 100-180 -- tests/test_first_hour.py -k connect

Options: --limit N (evenly spread over the points, default all), --lines A-B (only points on
those lines), --timeout S per mutant (default 300), --json FILE (every result), --survivors
FILE (only the points that survived in an earlier run's --json: after writing the tests
that should kill them; the module must not have changed since).
The tests run once on the unchanged copy first: if they fail there, every mutant would
look killed, so the run stops.
Exit status: 0 when every mutant was killed, 1 when some survived, 2 on bad arguments or
tests that fail without a mutant.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPY = ("agent", "tests", "scripts", "configs", "mosquitto", "setup.cfg", "setup.py", "README.md")

_COMPARE_SWAP: dict[type, type] = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
                                   ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
                                   ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BINOP_SWAP: dict[type, type] = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}


@dataclass(frozen=True)
class Point:
    """One mutation: the n-th node of its kind in a walk of the module, and what it becomes."""

    module: str
    index: int      # position in ast.walk order (stable for an unchanged source)
    line: int
    what: str       # e.g. "< -> <=", "and -> or", "3 -> 4", "return x -> return None"


@dataclass
class Result:
    point: Point
    outcome: str    # killed | survived | timeout | broken (the mutant did not compile)
    seconds: float


def _mutate(node: ast.AST) -> tuple[ast.AST, str] | None:
    """The mutant of one node, or None when it has no mutation here."""
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE_SWAP:
        new = _COMPARE_SWAP[type(node.ops[0])]()
        return (ast.Compare(node.left, [new], node.comparators),
                f"{_sym(node.ops[0])} -> {_sym(new)}")
    if isinstance(node, ast.BoolOp):
        new_op: ast.boolop = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        return ast.BoolOp(new_op, node.values), f"{_sym(node.op)} -> {_sym(new_op)}"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return node.operand, "not x -> x"
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAP:
        new_bin = _BINOP_SWAP[type(node.op)]()
        return ast.BinOp(node.left, new_bin, node.right), f"{_sym(node.op)} -> {_sym(new_bin)}"
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return ast.Constant(not node.value), f"{node.value} -> {not node.value}"
    if isinstance(node, ast.Constant) and type(node.value) is int and 0 <= node.value <= 1000:
        return ast.Constant(node.value + 1), f"{node.value} -> {node.value + 1}"
    if isinstance(node, ast.Return) and node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None):
        return ast.Return(ast.Constant(None)), "return x -> return None"
    return None


def _sym(op: ast.AST) -> str:
    return {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
            ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.And: "and",
            ast.Or: "or", ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}.get(type(op), "?")


def _stub(node: ast.AST) -> bool:
    """A function whose body is only a docstring and/or ``...`` (a Protocol's method): its
    defaults are never used, so a mutant of them is equivalent by construction."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    return all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
               and (s.value.value is Ellipsis or isinstance(s.value.value, str)) for s in node.body)


def _skipped(tree: ast.Module) -> set[int]:
    """Ids of nodes not worth mutating: docstrings, annotations, log and error messages,
    the defaults of stubs."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if _stub(node):
            skip.update(id(n) for n in ast.walk(node))
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skip.update(id(n) for n in ast.walk(body[0]))
        for ann in [getattr(node, "annotation", None), getattr(node, "returns", None)]:
            if ann is not None:
                skip.update(id(n) for n in ast.walk(ann))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "debug", "info", "warning", "error", "exception"):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def points(module: Path, lines: tuple[int, int] | None = None) -> list[Point]:
    tree = ast.parse(module.read_text())
    skip = _skipped(tree)
    found = []
    for index, node in enumerate(ast.walk(tree)):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        mutant = _mutate(node)
        if mutant is None or (lines and not lines[0] <= node.lineno <= lines[1]):
            continue
        found.append(Point(str(module.relative_to(REPO)), index, node.lineno, mutant[1]))
    return found


def survivors_of(todo: list[Point], wanted: set[Point]) -> tuple[list[Point], int]:
    """The points of ``todo`` that an earlier run left alive (``wanted``, of any modules),
    and how many of those in the modules of ``todo`` are points no longer."""
    named = {p.module for p in todo}
    wanted = {w for w in wanted if w.module in named}
    kept = [p for p in todo if p in wanted]
    return kept, len(wanted) - len(kept)


def mutant_source(source: str, point: Point) -> str:
    tree = ast.parse(source)
    parents: dict[int, tuple[ast.AST, str, int | None]] = {}
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if isinstance(value, list):
                for k, child in enumerate(value):
                    if isinstance(child, ast.AST):
                        parents[id(child)] = (parent, field, k)
            elif isinstance(value, ast.AST):
                parents[id(value)] = (parent, field, None)
    target = list(ast.walk(tree))[point.index]
    mutated = _mutate(target)
    if mutated is None:
        raise ValueError(f"no mutation at {point}")
    parent, field, position = parents[id(target)]
    new = ast.copy_location(mutated[0], target)
    if position is None:
        setattr(parent, field, new)
    else:
        getattr(parent, field)[position] = new
    return ast.unparse(ast.fix_missing_locations(tree))


def _pytest(work: Path, pytest_args: list[str], timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *pytest_args],
                          cwd=work, capture_output=True, timeout=timeout_s, check=False)


def baseline(work: Path, pytest_args: list[str], timeout_s: float) -> str | None:
    """Why the tests cannot judge mutants (they fail, or find nothing, on the unchanged
    copy: then every mutant would count as killed), or None when they pass."""
    try:
        proc = _pytest(work, pytest_args, timeout_s)
    except subprocess.TimeoutExpired:
        return f"the tests take longer than {timeout_s:.0f} s without any mutant"
    return unfit(proc)


def unfit(proc: subprocess.CompletedProcess[bytes]) -> str | None:
    """``baseline``'s verdict on the run of the tests on the unchanged copy."""
    if proc.returncode == 0:
        return None
    tail = "\n".join((proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()[-15:])
    return f"the tests fail without any mutant (pytest exit {proc.returncode}):\n{tail}"


def run(point: Point, work: Path, pytest_args: list[str], timeout_s: float) -> Result:
    original = (REPO / point.module).read_text()
    target = work / point.module
    started = time.monotonic()
    try:
        source = mutant_source(original, point)
        compile(source, point.module, "exec")
    except (SyntaxError, ValueError):
        return Result(point, "broken", 0.0)
    target.write_text(source)
    try:
        proc = _pytest(work, pytest_args, timeout_s)
        outcome = "survived" if proc.returncode == 0 else "killed"
    except subprocess.TimeoutExpired:
        outcome = "timeout"   # counted as killed: the suite did notice (it hung)
    finally:
        target.write_text(original)
    return Result(point, outcome, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: scripts/mutate MODULE... [--limit N] [--lines A-B] [--timeout S] [--json FILE] "
              "[--survivors FILE] -- PYTEST_ARGS...", file=sys.stderr)
        return 2
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="scripts/mutate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="+", type=Path)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--lines", default="")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--survivors", type=Path)
    args = parser.parse_args(argv[:cut])
    pytest_args = argv[cut + 1:]
    lines = None
    if args.lines:
        a, _, b = args.lines.partition("-")
        lines = (int(a), int(b or a))
    todo: list[Point] = []
    for module in args.modules:
        path = (module if module.is_absolute() else Path.cwd() / module).resolve()
        if not path.is_file() or REPO not in path.parents:
            print(f"error: {module} is not a file in {REPO}", file=sys.stderr)
            return 2
        todo += points(path, lines)
    if args.survivors:
        try:
            earlier = json.loads(args.survivors.read_text())
            wanted = {Point(r["module"], r["index"], r["line"], r["what"]) for r in earlier
                      if r["outcome"] == "survived"}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: {args.survivors}: not the --json of an earlier run ({exc})", file=sys.stderr)
            return 2
        todo, missing = survivors_of(todo, wanted)
        if missing:
            print(f"error: {missing} of the survivors in {args.survivors} are no longer "
                  "points of the modules named (did a module change?)", file=sys.stderr)
            return 2
    if args.limit and len(todo) > args.limit:
        step = len(todo) / args.limit
        todo = [todo[int(i * step)] for i in range(args.limit)]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        work = Path(tmp)
        for name in COPY:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, work / name)
            else:
                shutil.copy2(src, work / name)
        problem = baseline(work, pytest_args, args.timeout)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        for n, point in enumerate(todo, 1):
            result = run(point, work, pytest_args, args.timeout)
            results.append(result)
            print(f"[{n}/{len(todo)}] {result.outcome:8} {point.module}:{point.line} {point.what} "
                  f"({result.seconds:.1f} s)", file=sys.stderr, flush=True)
    counts = {k: sum(r.outcome == k for r in results) for k in ("killed", "timeout", "survived", "broken")}
    print(f"{len(results)} mutants: {counts['killed']} killed, {counts['timeout']} timed out (killed), "
          f"{counts['survived']} survived, {counts['broken']} did not compile")
    for r in results:
        if r.outcome == "survived":
            print(f"  survived: {r.point.module}:{r.point.line}  {r.point.what}")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r.point), "outcome": r.outcome, "seconds": r.seconds}
                                         for r in results], indent=1))
    return 1 if counts["survived"] else 0


if __name__ == "__main__":
    sys.exit(main())
