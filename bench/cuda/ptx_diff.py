#!/usr/bin/env python3
"""Compares the kernels of two builds without a GPU: the PTX of every kernel, modulo symbol names,
and ptxas's resource report (registers, spills, stack, shared memory) per kernel.

    nvcc -std=c++20 -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -O3 \
         -Iinclude -I/usr/include/eigen3 -ptx bench/cuda/cq_cuda_bench.cu -o X.ptx
    ptxas -arch=sm_90a -O3 -v X.ptx -o X.cubin 2> X.ptxas.txt
    python3 bench/cuda/ptx_diff.py BEFORE.ptx AFTER.ptx [--ptxas BEFORE.ptxas.txt AFTER.ptxas.txt]
                                   [--rename old=new ...] [--only SUBSTRING] [--show N]

Kernels are paired by their demangled names after the renames (applied to the BEFORE names, as
substrings, in order). Inside a kernel every mangled symbol is replaced by its demangled, renamed
form, and the kernel's own name (its parameters are NAME_param_i) by a placeholder, so a kernel
whose code did not change but whose name, namespace or parameter types did compares equal; labels
($L__BB<function index>_<block>) and string constants are numbered by their order in the module,
so those numbers are masked too.
--offsets also masks the byte offsets of parameter and struct loads ([%rd12+40] -> [%rd12+OFF],
[NAME_param_0+40] -> [K_param_0+OFF]) and the parameter block's sizes, for changes that move
members of a struct. Exit status 0 when every paired kernel compares equal and none is unpaired.
"""

import argparse
import difflib
import re
import subprocess
import sys

MANGLED = re.compile(r"_Z[\w$]+")


def demangle_all(names):
    names = sorted(set(names))
    if not names:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def rename(text, renames):
    for old, new in renames:
        text = text.replace(old, new)
    return text


def kernels(path):
    """{mangled entry name: [lines of its body]} and the lines outside entries. A body ends where its
    braces balance (inline asm brings its own balanced braces; vector operands balance per line)."""
    found, outside, name, body, depth = {}, [], None, [], 0
    for line in open(path):
        line = line.rstrip("\n")
        m = re.match(r"^(?:\.visible |\.weak )?\.entry (\S+)\(", line)
        if name is None and m:
            name, body, depth = m.group(1), [line], 0
            continue
        if name is not None:
            body.append(line)
            opened = depth > 0 or "{" in line
            depth += line.count("{") - line.count("}")
            if opened and depth == 0:
                found[name] = body
                name = None
        else:
            outside.append(line)
    return found, outside


def renumber(lines):
    """Virtual registers renamed by first appearance (%r7 -> %r<n>), declarations dropped: a
    diagnostic view that shows where two kernels' instruction streams part."""
    seen, count = {}, {}
    def sub(m):
        key = m.group(0)
        if key not in seen:
            count[m.group(1)] = count.get(m.group(1), 0) + 1
            seen[key] = f"{m.group(1)}#{count[m.group(1)]}"
        return seen[key]
    return [re.sub(r"(%(?:rd|rs|r|f|fd|p))\d+", sub, l) for l in lines if not l.lstrip().startswith(".reg")]


def key(name, names, renames):
    """A kernel's pairing key: its demangled, renamed name without the parameter list (the kernels
    compared here have no overloads, and a changed parameter type must not unpair them)."""
    return rename(names.get(name, name), renames).split("(")[0]


def normalise(name, body, names, renames, offsets, imm):
    own = key(name, names, renames)
    out = []
    for line in body:
        line = line.replace(name + "_param_", "K_param_").replace(name, "KERNEL")
        line = MANGLED.sub(lambda m: rename(names.get(m.group(0), m.group(0)), renames), line)
        # Labels carry the function's index in the module, strings and unnamed globals a counter.
        line = re.sub(r"\$L__BB\d+_", "$L__BB_", line)
        line = re.sub(r"\$str\$\d+|\$str\b|__unnamed_\d+", "GLOBAL", line)
        if offsets:
            line = re.sub(r"\[(%rd\d+|K_param_\d+)\+\d+\]", r"[\1+OFF]", line)
            line = re.sub(r"(\.param \.align \d+ \.b8 K_param_\d+)\[\d+\]", r"\1[SIZE]", line)
        for old, new in imm:  # element strides of struct arrays (mul.wide / mul.lo.s64 r, i, SIZE)
            line = re.sub(r"^(\s*mul\.(?:wide\.[su]32|lo\.s64)\s+%rd\d+, %rd?\d+, )" + old + ";", r"\g<1>" + new + ";",
                          line)
        out.append(line)
    return own, out


def ptxas_report(path, names, renames):
    """{demangled renamed kernel: 'registers / stack / spills / shared'} from ptxas -v output."""
    report, cur = {}, None
    for line in open(path):
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = key(m.group(1), names, renames)
            report[cur] = []
            continue
        if cur is not None and ("stack frame" in line or "Used" in line):
            report[cur].append(re.sub(r"\s+", " ", re.sub(r"ptxas info\s*:", "", line)).strip())
    return {k: "; ".join(v) for k, v in report.items()}


def elf_sections(path):
    """{section name: bytes} of an ELF64 file (a cubin)."""
    import struct
    d = open(path, "rb").read()
    shoff = struct.unpack_from("<Q", d, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 0x3A)
    hdr = [struct.unpack_from("<IIQQQQIIQQ", d, shoff + i * shentsize) for i in range(shnum)]
    names = hdr[shstrndx][4]
    out = {}
    for h in hdr:
        name = d[names + h[0]:d.index(b"\0", names + h[0])].decode()
        out[name] = d[h[4]:h[4] + h[5]]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rename", action="append", default=[], help="old=new, applied to demangled BEFORE names")
    ap.add_argument("--ptxas", nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--cubin", nargs=2, metavar=("BEFORE", "AFTER"),
                    help="also compare each kernel's machine code (.text section of ptxas's cubin) byte for byte")
    ap.add_argument("--offsets", action="store_true", help="mask load offsets and parameter sizes")
    ap.add_argument("--stride", action="append", default=[],
                    help="old=new: a struct array's element size changed (applied to BEFORE's mul.wide, mul.lo.s64)")
    ap.add_argument("--only", help="compare kernels whose name contains this")
    ap.add_argument("--renumber", action="store_true", help="diagnostic: registers renumbered by first use")
    ap.add_argument("--show", type=int, default=40, help="diff lines shown per differing kernel")
    a = ap.parse_args()
    renames = [tuple(r.split("=", 1)) for r in a.rename]
    kb, _ = kernels(a.before)
    ka, _ = kernels(a.after)
    all_symbols = set(kb) | set(ka)
    for k in list(kb.values()) + list(ka.values()):
        for line in k:
            all_symbols.update(MANGLED.findall(line))
    names = demangle_all(all_symbols)
    strides = [tuple(x.split("=", 1)) for x in a.stride]
    nb = dict(normalise(n, b, names, renames, a.offsets, strides) for n, b in kb.items())
    na = dict(normalise(n, b, names, {}, a.offsets, []) for n, b in ka.items())
    if a.renumber:
        nb = {k: renumber(v) for k, v in nb.items()}
        na = {k: renumber(v) for k, v in na.items()}
    if a.only:
        nb = {k: v for k, v in nb.items() if a.only in k}
        na = {k: v for k, v in na.items() if a.only in k}
    ok = True
    for k in sorted(set(nb) | set(na)):
        short = k
        if k not in na or k not in nb:
            print(f"UNPAIRED ({'before' if k in nb else 'after'} only): {short}")
            ok = False
            continue
        if nb[k] == na[k]:
            print(f"same      {short} ({len(nb[k])} lines)")
            continue
        ok = False
        diff = [l for l in difflib.unified_diff(nb[k], na[k], lineterm="", n=1)][2:]
        changed = sum(1 for l in diff if l[:1] in "+-")
        print(f"DIFFERENT {short} ({changed} lines changed of {len(nb[k])})")
        for l in diff[: a.show]:
            print("    " + l)
    if a.ptxas:
        rb = ptxas_report(a.ptxas[0], names, renames)
        ra = ptxas_report(a.ptxas[1], names, {})
        print("\nptxas -v, per kernel:")
        for k in sorted(set(rb) | set(ra)):
            if a.only and a.only not in k:
                continue
            short = k
            if rb.get(k) == ra.get(k):
                print(f"same      {short}: {ra[k]}")
            else:
                ok = False
                print(f"DIFFERENT {short}:\n    before: {rb.get(k)}\n    after:  {ra.get(k)}")
    if a.cubin:
        sb, sa = elf_sections(a.cubin[0]), elf_sections(a.cubin[1])
        tb = {key(n[6:], names, renames): v for n, v in sb.items() if n.startswith(".text.")}
        ta = {key(n[6:], names, []): v for n, v in sa.items() if n.startswith(".text.")}
        print("\nmachine code (cubin .text), per kernel:")
        for k in sorted(set(tb) | set(ta)):
            if a.only and a.only not in k:
                continue
            short = k
            if k in tb and k in ta and tb[k] == ta[k]:
                print(f"same      {short} ({len(ta[k])} bytes)")
            else:
                ok = False
                print(f"DIFFERENT {short}: {len(tb.get(k, b''))} -> {len(ta.get(k, b''))} bytes")
    print("\nresult:", "every kernel equal" if ok else "differences above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
