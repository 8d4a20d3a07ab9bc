"""Which step a benchmark is on, one line on stderr ("[3/84] digits · pytriton · c=16"): the
runs take minutes, and stdout stays for the report or the JSON."""

from __future__ import annotations

import sys


def step(number: int, total: int, *what: str) -> None:
    print(f"[{number}/{total}] " + " · ".join(what), file=sys.stderr, flush=True)
