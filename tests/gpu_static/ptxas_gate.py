#!/usr/bin/env python3
"""The CUDA module's kernels through ptxas, with the module's real flags
(label gpu_static).

usage: ptxas_gate.py --src SRC --build BUILD --check GPU_STATIC_RESOURCES
                     [--nvcc NVCC] [--generator GEN] [--save-ptx DIR]

Compiles each source of the CUDA module (the kernels/cuda/*.cu entries of
BUILD/compile_commands.json: the very commands the build runs, -O3,
-lineinfo, warnings as errors and all) for sm_80 and sm_90, with
-Xptxas -v and --keep, and collects for every kernel instance ptxas's
registers, stack frame, spill stores and loads and static shared memory,
and from the PTX its __launch_bounds__ (.maxntid, .minnctapersm) and
.maxnreg. GPU_STATIC_RESOURCES (static_resources.cc) checks them against
the limits and prints one line per instance; its exit status is this
test's.

A build tree that does not build the module (BS_CUDA=OFF, or the sanitizer
build) has no such commands: they then come from a Release configuration
with BS_CUDA=ON in BUILD/tests/gpu_static/module_flags (configured, not
built). Exit 77 (CTest: skipped) only when there is no nvcc.

--save-ptx DIR keeps the sm_90 PTX of attn_cuda.cu as DIR/attn_cuda.sm_90.ptx
(removed first): static_perf.py (gpu_static_perf) counts its inner loop.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ARCHS = ("80", "90")
# Flags that choose architectures, or write dependency files: dropped from
# the build's command (the gate names its own architectures and outputs).
ARCH_FLAGS = ("--generate-code", "-gencode", "--gpu-architecture", "-arch", "--gpu-code",
              "-code")
ARG_FLAGS = ("-o", "-MT", "-MF", "-MQ", "--output-file", "--dependency-output")
BARE_FLAGS = ("-MD", "-MMD", "--generate-dependencies-with-compile")


def find_nvcc(given):
    """The nvcc CMake found (the build's, else one on PATH or in /usr/local/cuda)."""
    if given and os.path.isfile(given) and os.access(given, os.X_OK):
        return given
    return None


def module_commands(build, src):
    path = os.path.join(build, "compile_commands.json")
    if not os.path.exists(path):
        return []
    kdir = os.path.join(os.path.realpath(src), "kernels", "cuda") + os.sep
    out = []
    for e in json.load(open(path)):
        f = os.path.realpath(os.path.join(e["directory"], e["file"]))
        if f.startswith(kdir) and f.endswith(".cu"):
            out.append(e)
    return out


def configure_module(src, build, nvcc, generator):
    """A Release configuration that builds the module: its compile commands."""
    cfg = os.path.join(build, "tests", "gpu_static", "module_flags")
    cmd = ["cmake", "-S", src, "-B", cfg, "-DCMAKE_BUILD_TYPE=Release", "-DBS_CUDA=ON",
           "-DBS_SANITIZE=OFF", "-DBS_BUILD_TESTS=OFF", "-DCMAKE_CUDA_COMPILER=" + nvcc]
    if generator:
        cmd += ["-G", generator]
    print("NOTE: this build tree does not build the CUDA module; its flags come from a "
          "Release configuration with BS_CUDA=ON in " + cfg)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        print(r.stdout)
        sys.exit("FAIL: configuring " + cfg)
    return module_commands(cfg, src)


def gate_argv(entry, keep, nvcc):
    """The build's command for entry, for sm_80 and sm_90, ptxas verbose."""
    argv = entry["arguments"] if "arguments" in entry else shlex.split(entry["command"])
    out, skip = [nvcc], False
    archs_seen = []
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a in ARG_FLAGS or a in ARCH_FLAGS:
            skip = True
            if a in ARCH_FLAGS:
                archs_seen.append(a)
            continue
        if a in BARE_FLAGS:
            continue
        if any(a.startswith(f + "=") for f in ARCH_FLAGS + ARG_FLAGS):
            if not a.startswith(ARG_FLAGS):
                archs_seen.append(a)
            continue
        out.append(a)
    for arch in ARCHS:
        out.append("--generate-code=arch=compute_%s,code=sm_%s" % (arch, arch))
    name = os.path.basename(entry["file"])
    out += ["-Xptxas", "-v", "--keep", "--keep-dir", keep, "-o", os.path.join(keep, name + ".o")]
    return out, archs_seen


def parse_ptxas(text):
    """{(arch, mangled): figures} from ptxas -v's lines."""
    recs, cur, prop_for = {}, None, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            cur = (m.group(2), m.group(1))
            recs[cur] = {"regs": None, "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 0}
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            prop_for = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m and cur and prop_for == cur[1]:
            recs[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)),
                             spill_ld=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            recs[cur]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            recs[cur]["smem"] = int(s.group(1)) if s else 0
    return recs


def parse_ptx(path):
    """{mangled: (maxntid, minnctapersm, maxnreg)} from a PTX file's entries."""
    out = {}
    text = open(path).read()
    for m in re.finditer(r"\.entry\s+(\w+)\s*\((.*?)\)(.*?)\{", text, re.S):
        head = m.group(3)
        ntid = re.search(r"\.(?:maxntid|reqntid)\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?", head)
        threads = 0
        if ntid:
            threads = 1
            for g in ntid.groups():
                threads *= int(g) if g else 1
        minb = re.search(r"\.minnctapersm\s+(\d+)", head)
        maxr = re.search(r"\.maxnreg\s+(\d+)", head)
        out[m.group(1)] = (threads, int(minb.group(1)) if minb else 0,
                           int(maxr.group(1)) if maxr else 0)
    return out


def demangle(names):
    """'attn_mma<__nv_bfloat16, 80, 8, false>' for each mangled name."""
    r = subprocess.run(["c++filt"], input="\n".join(names) + "\n", stdout=subprocess.PIPE,
                       text=True, check=True)
    out = {}
    for mangled, full in zip(names, r.stdout.splitlines()):
        full = re.sub(r"^void\s+", "", full)
        depth = 0
        for i, ch in enumerate(full):
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                full = full[:i]
                break
        out[mangled] = full.strip()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--build", required=True)
    ap.add_argument("--check", required=True)
    ap.add_argument("--nvcc", default="")
    ap.add_argument("--generator", default="")
    ap.add_argument("--save-ptx", default="")
    args = ap.parse_args()
    saved = os.path.join(args.save_ptx, "attn_cuda.sm_90.ptx") if args.save_ptx else ""
    if saved and os.path.exists(saved):
        os.remove(saved)

    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("SKIP: no nvcc (CMake found none on PATH or in /usr/local/cuda/bin): the "
              "kernels' ptxas figures need the CUDA compiler")
        return 77
    entries = module_commands(args.build, args.src)
    if not entries:
        entries = configure_module(args.src, args.build, nvcc, args.generator)
    if not entries:
        print("FAIL: no kernels/cuda/*.cu compile command found")
        return 1

    recs, bounds = {}, {}
    with tempfile.TemporaryDirectory(prefix="gpu_static_") as tmp:
        for e in entries:
            keep = os.path.join(tmp, os.path.basename(e["file"]))
            os.makedirs(keep)
            argv, archs_seen = gate_argv(e, keep, nvcc)
            print("nvcc: " + " ".join(shlex.quote(a) for a in argv[1:]))
            if archs_seen:
                print("  (the build's own architectures, replaced: %s)" % " ".join(archs_seen))
            r = subprocess.run(argv, cwd=e["directory"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                print(r.stdout)
                print("FAIL: nvcc exited with %d on %s" % (r.returncode, e["file"]))
                return 1
            recs.update(parse_ptxas(r.stdout))
            for f in os.listdir(keep):
                m = re.search(r"\.compute_(\d+)\.ptx$", f)
                if m and saved and m.group(1) == "90" and f.startswith("attn_cuda"):
                    os.makedirs(args.save_ptx, exist_ok=True)
                    shutil.copyfile(os.path.join(keep, f), saved)
                if m:
                    for k, v in parse_ptx(os.path.join(keep, f)).items():
                        bounds[("sm_" + m.group(1), k)] = v

        missing = [k for k, v in recs.items() if v["regs"] is None or k not in bounds]
        if missing or not recs:
            print("FAIL: ptxas or PTX figures missing for %s" % (missing or "every kernel"))
            return 1
        names = demangle(sorted({k[1] for k in recs}))
        table = os.path.join(tmp, "records.tsv")
        with open(table, "w") as f:
            for (arch, mangled), v in sorted(recs.items()):
                b = bounds[(arch, mangled)]
                f.write("\t".join(str(x) for x in (
                    arch, names[mangled], v["regs"], v["stack"], v["spill_st"], v["spill_ld"],
                    v["smem"], b[0], b[1], b[2])) + "\n")
        sys.stdout.flush()
        return subprocess.run([args.check, table]).returncode


if __name__ == "__main__":
    sys.exit(main())
