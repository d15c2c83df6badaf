"""A stand-in for Qualcomm's ``genie-t2t-run`` that writes its output format byte for byte.

    fake_genie.py -c CONFIG.json --prompt_file FILE [--profile FILE]

CONFIG.json is a real Genie config in production; here its ``"fake"`` object drives the
stand-in (every key optional):

    answer     the text to generate (default "Paris is the capital of France.")
    mode       ok | no_end | dsp_error | fail | fail_once | split_utf8 | never_begins
    delay_ms   pause between tokens, as a real model takes time per token (default 2)
    marker     a file; "fail_once" fails when it is absent and creates it
    calls      a file to which every invocation appends one line (counts executions)

It writes tokens unbuffered, one write per token, so a reader sees them as they come.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

BANNER = (
    "Using libGenie.so version 1.10.0\n"
    "\n"
    "[WARN]  \"Unable to initialize logging in backend extensions.\"\n"
    "[INFO]  \"Using create From Binary\"\n"
    "[INFO]  \"Allocated total size = 609845248 across 10 buffers\"\n"
)


def write(data: bytes) -> None:
    os.write(1, data)


def main() -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--prompt_file", required=True)
    parser.add_argument("--profile")
    args = parser.parse_args()
    fake = json.loads(Path(args.config).read_text()).get("fake", {})
    mode = fake.get("mode", "ok")
    answer = fake.get("answer", "Paris is the capital of France.")
    delay = fake.get("delay_ms", 2) / 1000
    if fake.get("calls"):
        with open(fake["calls"], "a") as fh:
            fh.write(f"{os.getpid()}\n")

    if mode == "fail_once" and not Path(fake["marker"]).exists():
        Path(fake["marker"]).write_text("failed once")
        sys.stderr.write("[ERROR] \"Could not create context from binary.\"\n")
        return 1
    started = time.monotonic()
    write(BANNER.encode())
    if mode == "dsp_error":
        write(b"[ERROR] \"Failed to create device: 14001\"\n")
        sys.stderr.write("Failed to create device: 14001\n")
        return 1

    prompt = Path(args.prompt_file).read_bytes()
    write(b"[PROMPT]: " + prompt + b"\n\n")
    if mode == "never_begins":
        return 0
    init_done = time.monotonic()
    write(b"[BEGIN]: ")
    tokens = re.findall(r"\s*\S+", answer)
    for token in tokens:
        time.sleep(delay)  # a stand-in device simulating per-token work
        data = token.encode()
        if mode == "split_utf8":
            for i in range(len(data)):  # every byte its own write: splits multi-byte chars
                write(data[i:i + 1])
        else:
            write(data)
        if mode == "fail" and token is tokens[len(tokens) // 2]:
            sys.stderr.write("[ERROR] \"QnnGraph execute failed\"\n")
            return 3
    gen_done = time.monotonic()
    if mode != "no_end":
        write(b"[END]")
    init_us = int((init_done - started) * 1e6) + 1000
    gen_us = int((gen_done - init_done) * 1e6) + 1
    prompt_tokens = max(1, len(prompt) // 4)
    write(("\n\n[KPIS]:\n"
           f"Init Time: {init_us} us\n"
           f"Prompt Processing Time: 2000 us, Prompt Processing Rate : {prompt_tokens / 0.002:.2f} toks/sec\n"
           f"Token Generation Time: {gen_us} us, Token Generation Rate: {len(tokens) / (gen_us / 1e6):.2f} toks/sec\n")
          .encode())
    if args.profile:
        Path(args.profile).write_text(json.dumps({
            "header": {"header_version": {"major": 0, "minor": 1, "patch": 0},
                       "version": {"major": 1, "minor": 10, "patch": 0}, "artifact_type": "GENIE_PROFILE"},
            "metadata": {"timestamp": int(time.time() * 1e6)},
            "components": [{"name": "dialog0", "type": "dialog", "events": [
                {"type": "GenieDialog_create", "duration": init_us, "start": 0, "stop": init_us},
                {"type": "GenieDialog_query", "duration": gen_us + 2000, "start": init_us,
                 "stop": init_us + gen_us + 2000,
                 "num-prompt-tokens": {"value": prompt_tokens, "unit": ""},
                 "time-to-first-token": {"value": 2000, "unit": "us"},
                 "num-generated-tokens": {"value": len(tokens), "unit": ""},
                 "token-generation-time": {"value": gen_us, "unit": "us"}},
            ]}],
        }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
