"""Fuzz every parser of outside input: hypothesis at length, then atheris.

    scripts/fuzz [--target NAME ...] [--examples N] [--atheris-runs N]

The targets (tests/support/fuzz.py) are the message decoders, the trigger parser, the
topic parser, the config loader (YAML text), Genie's stdout/KPI/profile parsers, the SSE
event parser, the state files (arm store, journal, stragglers) and the control socket's
request. Each may return or raise its typed error; anything else is reported with the
input, and the exit code is 1. The suite runs the same targets briefly
(tests/test_fuzz.py); this is the long run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.support.fuzz import TARGETS, inputs  # noqa: E402


def with_hypothesis(name: str, examples: int) -> list[str]:
    found: list[str] = []
    target = TARGETS[name]

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(inputs(name))
    def run(data: bytes) -> None:
        try:
            target.check(data)
        except AssertionError as exc:
            found.append(str(exc)[:400])

    run()
    return found


def with_atheris(names: list[str], runs: int) -> list[str]:
    """Coverage-guided: atheris drives one entry point that picks the target from the
    first byte. It calls exit when done, so it runs in a child process per call."""
    import atheris

    found: list[str] = []

    def one(data: bytes) -> None:
        if not data:
            return
        target = TARGETS[names[data[0] % len(names)]]
        try:
            target.check(data[1:])
        except AssertionError as exc:
            found.append(str(exc)[:400])
            raise

    corpus = Path(tempfile.mkdtemp(prefix="edge-agent-corpus-"))
    for i, name in enumerate(names):
        for j, seed in enumerate(TARGETS[name].seeds):
            (corpus / f"{name}-{j}").write_bytes(bytes([i]) + seed)
    atheris.instrument_all()  # coverage feedback from every module loaded: the agent's parsers
    print(f"atheris corpus: {corpus}", flush=True)
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-rss_limit_mb=4096", "-max_len=8192", str(corpus)], one)
    atheris.Fuzz()
    return found  # not reached: atheris exits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="only these (repeatable)")
    ap.add_argument("--examples", type=int, default=20_000, help="hypothesis examples per target (%(default)s)")
    ap.add_argument("--atheris-runs", type=int, default=200_000,
                    help="atheris executions over all targets; 0 to skip (%(default)s)")
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)  # the targets log what they drop; thousands of lines a second
    names = args.target or sorted(TARGETS)
    failures = 0
    for name in names:
        start = time.monotonic()
        found = with_hypothesis(name, args.examples)
        failures += len(found)
        print(f"hypothesis {name:<14} {args.examples} examples in {time.monotonic() - start:6.1f} s: "
              f"{'ok' if not found else f'{len(found)} untyped error(s)'}", flush=True)
        for line in found[:5]:
            print(f"    {line}")
    if args.atheris_runs:
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed (pip install -e '.[fuzz]'): skipped")
        else:
            print(f"atheris: {args.atheris_runs} runs over {len(names)} target(s); a crash prints its input "
                  "and stops with a non-zero exit", flush=True)
            with_atheris(names, args.atheris_runs)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
