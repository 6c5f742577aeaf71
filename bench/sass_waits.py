"""The scoreboard waits of a kernel's SASS: which instruction waits for which earlier
variable-latency instruction (a load, an atomic's register read, a special-register read).

`cuobjdump -sass` prints every instruction's control bits only as the high half of its
128-bit encoding (the hex comment on the line after it). This decodes them (the Volta-and-later
layout of that half): the stall count, the scoreboard the instruction sets when its result is
written (wb) and when its source registers have been read (rb), and the scoreboards it waits
on before it issues (W). A wait on a scoreboard that a REDG set with rb, for example, holds
the instruction until those atomics have read their registers.

    cuobjdump -sass kernel.cubin > kernel.sass      # or the shared library
    python bench/sass_waits.py kernel.sass --function attention_bwd_dkdv --lines 1160:1245

The cuobjdump and nvdisasm of the PyPI wheels nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm
run on a machine without a GPU. bench/NOTES.md ("The producer's proxy fence") used it: at
the dk/dv kernel's loop top a special register read again every step (`S2R SR_TID.X`, `S2UR
SR_CgaCtaId`) waits there for the dq atomics of the step before to read their registers.
"""
from __future__ import annotations

import argparse
import re
import sys

INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* (0x[0-9a-f]+) \*/")
HIGH_HALF = re.compile(r"^\s*/\* (0x[0-9a-f]+) \*/\s*$")


def control_bits(high: int) -> dict:
    """The control bits of an instruction from the high 64 bits of its encoding: stall
    cycles, yield, the write and read scoreboards it sets (None: none) and the scoreboards it
    waits on."""
    wb = (high >> 46) & 7
    rb = (high >> 49) & 7
    wait = (high >> 52) & 0x3F
    return {"stall": (high >> 41) & 0xF, "yield": (high >> 45) & 1,
            "wb": None if wb == 7 else wb, "rb": None if rb == 7 else rb,
            "wait": [b for b in range(6) if wait >> b & 1]}


def read_sass(lines, function: str | None = None):
    """[(line number, address, instruction text, control bits)] of the first function whose
    name contains `function` (every instruction when None)."""
    out, inside = [], function is None
    for i, line in enumerate(lines):
        if "Function :" in line:
            if inside and function is not None and out:
                break
            inside = function is None or function in line
            continue
        if not inside:
            continue
        m = INSTRUCTION.match(line)
        if m and i + 1 < len(lines):
            h = HIGH_HALF.match(lines[i + 1])
            if h:
                out.append((i + 1, m.group(1), m.group(2), control_bits(int(h.group(1), 16))))
    return out


def format_line(entry) -> str:
    line, address, text, c = entry
    wait = "".join(str(b) for b in c["wait"]) or "-"
    wb = "-" if c["wb"] is None else c["wb"]
    rb = "-" if c["rb"] is None else c["rb"]
    return f"{line:7d} {address:>6} W:{wait:6s} wb:{wb} rb:{rb} s:{c['stall']:2d}  {text}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sass", help="cuobjdump -sass output")
    ap.add_argument("--function", help="a substring of the function's (mangled) name")
    ap.add_argument("--lines", help="FIRST:LAST line numbers of the dump to print")
    args = ap.parse_args(argv)
    with open(args.sass) as f:
        entries = read_sass(f.read().split("\n"), args.function)
    if args.lines:
        first, last = (int(x) for x in args.lines.split(":"))
        entries = [e for e in entries if first <= e[0] <= last]
    for e in entries:
        print(format_line(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
