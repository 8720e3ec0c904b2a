#!/usr/bin/env python3
"""The loops of a PTX function that hold mma instructions, and what they issue.

usage: ptx_loops.py PTX [KERNEL_SUBSTRING ...]

A helper of static_perf.py (imported), runnable alone to look at a PTX file:
for each .entry whose mangled name contains one of the substrings, every
loop (a backward branch to a label above it) that contains mma.sync, with
its static instruction count, its mma count and the instructions by kind.
The count is static: both sides of a branch inside the loop are counted,
so it is an upper bound on what one iteration issues on any one path."""
import re
import sys
from collections import Counter

KINDS = (("mma", r"^mma\."), ("ldmatrix", r"^ldmatrix\."), ("cp.async", r"^cp\.async"),
         ("ld.shared", r"^ld\.shared"), ("st.shared", r"^st\.shared"),
         ("ld.global", r"^ld\.global"), ("shfl", r"^shfl"), ("ex2", r"^ex2"),
         ("bar", r"^(bar|barrier)\."), ("branch", r"^bra"))


def entries(text):
    """{mangled: [body lines]} of every .entry."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\(", text):
        start = text.index("{", m.end())
        # the body ends at the matching closing brace at column 0
        end = text.index("\n}", start)
        out[m.group(1)] = text[start + 1:end].splitlines()
    return out


def instr(line):
    """The instruction of a PTX line (predicate dropped), or None."""
    s = line.split("//")[0].strip()
    if not s or s.endswith(":") or s[0] in ".{}" or not s.endswith(";"):
        return None
    return re.sub(r"^@!?%\w+\s+", "", s)


def kind(ins):
    for name, pat in KINDS:
        if re.match(pat, ins):
            return name
    return "other"


def loops(body):
    """[(first line, last line)] of every loop: a branch back to a label above it."""
    labels = {}
    for i, line in enumerate(body):
        m = re.match(r"^\s*(\$\w+):", line)
        if m:
            labels[m.group(1)] = i
    out = []
    for i, line in enumerate(body):
        ins = instr(line)
        if ins is None:
            continue
        m = re.match(r"^bra(?:\.uni)?\s+(\$\w+);", ins)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            out.append((labels[m.group(1)], i))
    return out


def mma_loops(body):
    """[(instructions, mma, Counter by kind)] of each loop holding mma."""
    res = []
    for a, b in loops(body):
        c = Counter()
        for line in body[a:b + 1]:
            ins = instr(line)
            if ins is not None:
                c[kind(ins)] += 1
        if c["mma"]:
            res.append((sum(c.values()), c["mma"], c))
    return res


def main():
    text = open(sys.argv[1]).read()
    subs = sys.argv[2:]
    for name, body in sorted(entries(text).items()):
        if subs and not any(s in name for s in subs):
            continue
        for n, mma, c in mma_loops(body):
            print("%s: loop of %d instructions, %d mma: %.2f per mma; %s" %
                  (name, n, mma, n / mma, dict(c)))


if __name__ == "__main__":
    main()
