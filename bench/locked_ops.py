#!/usr/bin/env python3
"""Locked (atomic read-modify-write) instructions per request in a callgrind dump.

Usage: locked_ops.py DUMP REQUESTS [TOP]

DUMP is a callgrind file written with `--dump-instr=yes` (bench/instructions.sh
does). Each executed instruction's count is matched against the `objdump -d`
listing of its object; `lock`-prefixed instructions and `xchg` with memory
(locked without a prefix) are summed. Prints the total per request and, with
TOP, the TOP sites by count with their function and source line.

Why: an uncontended locked instruction costs ~5.5 ns on the bench VM (against
~0.7 for a plain load and store; bench/README, "Atomics"), and it also waits
for the stores before it. Instructions per request do not show it; this does.
"""
import collections
import re
import subprocess
import sys

# Name compression in the callgrind format: "ob=(3) /path" defines id 3,
# "ob=(3)" refers to it. Calls name their callee's object and file too.
KINDS = {"ob": "ob", "cob": "ob", "fl": "fl", "fi": "fl", "fe": "fl", "cfi": "fl", "cfl": "fl"}
NAME = re.compile(r"^(ob|cob|fl|fi|fe|cfi|cfl)=\((\d+)\)(?: (.*))?$")
SHORTEN = (re.compile(r"^.*/registry/src/[^/]+/"), re.compile(r"^/rustc/[0-9a-f]+/"))


def position(token, current):
    if token == "*":
        return current
    if token.startswith("0x"):
        return int(token, 16)
    if token[0] in "+-":
        return current + int(token)
    return int(token)


def self_costs(path):
    """(object, address) -> (instructions executed there, (file, line))."""
    names, cost, where = {}, collections.Counter(), {}
    obj = fil = None
    addr = line = 0
    after_calls = False
    with open(path) as f:
        for raw in f:
            text = raw.rstrip("\n")
            if not text or text[0] == "#":
                continue
            m = NAME.match(text)
            if m:
                kind, ident, name = m.groups()
                key = (KINDS[kind], ident)
                if name:
                    names[key] = name
                if kind == "ob":
                    obj = names.get(key)
                elif kind in ("fl", "fi", "fe"):
                    fil = names.get(key)
                continue
            if text.startswith("calls="):
                # The next line is the call's inclusive cost, not this
                # instruction's own.
                after_calls = True
                continue
            if text[0].isdigit() or text[0] in "+-*":
                parts = text.split()
                addr, line = position(parts[0], addr), position(parts[1], line)
                if after_calls:
                    after_calls = False
                elif len(parts) >= 3:
                    cost[(obj, addr)] += int(parts[2])
                    where[(obj, addr)] = (fil, line)
    return cost, where


def locked_sites(cost, where):
    sites = collections.Counter()
    for obj in {o for o, _ in cost if o and o.startswith("/")}:
        listing = subprocess.run(
            ["objdump", "-d", "--no-show-raw-insn", "-C", obj],
            capture_output=True, text=True, check=False,
        ).stdout
        func = "?"
        for text in listing.splitlines():
            m = re.match(r"^([0-9a-f]+) <(.*)>:", text)
            if m:
                func = m.group(2)
                continue
            m = re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)", text)
            if not m:
                continue
            op, args = m.group(2), m.group(3)
            locked = op == "lock" or (op.startswith("xchg") and "(" in args)
            n = cost.get((obj, int(m.group(1), 16)), 0)
            if locked and n:
                fil, line = where[(obj, int(m.group(1), 16))]
                fil = fil or "?"
                for pattern in SHORTEN:
                    fil = pattern.sub("", fil)
                sites[(func[:70], f"{fil}:{line}")] += n
    return sites


def main(argv):
    dump, requests = argv[1], int(argv[2])
    top = int(argv[3]) if len(argv) > 3 else 0
    sites = locked_sites(*self_costs(dump))
    print(f"{sum(sites.values()) / requests:.1f}")
    for (func, src), n in sites.most_common(top):
        print(f"  {n / requests:6.2f}  {src:55}  {func}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
