"""CPU benchmark: blockserve's engine against PyTorch on the same modules,
shapes, threads and dtype (FP32, or BF16 with --dtype bf16), in one run, plus
the machine's yardstick: OpenBLAS sgemm for FP32, bench/bf16_peak.c's
vdpbf16ps throughput for BF16.

    /usr/bin/python3 bench/cpu_bench.py [--build build] [--threads 2] [--reps 5]
                                        [--dtype fp32|bf16] [--workloads a,b]
                                        [--json out.json] [--check-json]

For each workload: `blockserve example NAME` writes the model directory
(generated weights at the real shapes, inputs.safetensors), `blockserve bench`
times the engine, bench/torch_ref.py times tests/reference's modules (the
diffusers formulation) on the same files. Both report the median of --reps
forwards after one warm-up and their peak RSS during the forwards over their
start-up RSS (weights, inputs, activations, scratch). GFLOP/s counts matmul
FLOPs (linear layers and the two attention products), the engine's count for
both. The yardstick runs before and after the workloads; efficiency is
against the better of the two.

--dtype fp32 (the default): sgemm is the yardstick; targets: speedup >= 1.3
(4.0 for sd15_down0_block), efficiency >= 70%, peak MB below PyTorch's.

--dtype bf16: `blockserve bench --dtype bf16` against the same modules after
`module.to(torch.bfloat16)` with the float inputs cast to BF16 (torch_ref.py
--dtype bf16). Each side's output (`blockserve forward --dtype bf16`, and the
last timed PyTorch forward) is compared with an FP64 reference, the same
modules in float64 on the same inputs, computed in a subprocess of its own
(torch_ref.py --dtype fp64) so it does not touch either side's memory: err is
max|out - ref| / max|ref|, err_mean is mean|out - ref| / mean|ref|. The
yardstick is bs_bf16_peak (independent zmm vdpbf16ps on registers, 64 FLOPs
each); on a CPU without AVX512_BF16 it exits 77 and the peak and efficiency
are reported as unavailable (the engine falls back to AVX2 and still runs).
Targets: speedup >= 1.3, bs err <= torch err (the max figure), peak MB <=
PyTorch's, and efficiency >= 70% for the GEMM-bound workloads (sd15_mid_block,
dit_xl_block, dit_xl_trunk) only (reported for all).
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (built-in model, what it is)
WORKLOADS = {
    "sd15_down0_block": "SD-1.5 down-block-0 BasicTransformerBlock, dim 320, 8x40, 4096 tok, ctx 77x768, GEGLU, B1",
    "sd15_mid_block": "SD-1.5 mid-block BasicTransformerBlock, dim 1280, 8x160, 64 tok, ctx 77x768, B8",
    "dit_xl_block": "DiT-XL/2 BasicTransformerBlock, dim 1152, 16x72, 256 tok, ada_norm_zero, B4",
    "vae_mid_attention": "VAE mid AttentionBlock, 512 ch, 32x32, 1 head, B1",
    "dit_xl_trunk": "DiT-XL/2 trunk, 28 blocks, 256 tok, B1",
}
TARGET_SPEEDUP = {"sd15_down0_block": 4.0}
TARGET_SPEEDUP_OTHER = 1.3
TARGET_EFFICIENCY = 0.70
# --dtype bf16: one speedup target for all, efficiency only where GEMMs dominate.
TARGET_SPEEDUP_BF16 = 1.3
GEMM_BOUND = ("sd15_mid_block", "dit_xl_block", "dit_xl_trunk")
NO_BF16 = 77  # bs_bf16_peak's exit status on a CPU without AVX512_BF16


def kv(line):
    """Parse 'a=1 b=x' pairs of a line into a dict (numbers as floats)."""
    out = {}
    for k, v in re.findall(r"(\w+)=(\S+)", line):
        try:
            out[k] = float(v)
        except ValueError:
            out[k] = v
    return out


def run(cmd, what):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"cpu_bench: {what} failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}{p.stdout}")
    return p.stdout


def sgemm(args):
    out = run([os.path.join(args.build, "bench", "bs_sgemm_peak"), "--n", str(args.sgemm_n),
               "--threads", str(args.threads)], "sgemm")
    return kv(out)


def bf16_peak(args):
    """bs_bf16_peak's GFLOP/s on --threads threads, or None without AVX512_BF16."""
    cmd = [os.path.join(args.build, "bench", "bs_bf16_peak"), "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode == NO_BF16:
        print(f"cpu_bench: BF16 peak unavailable: {p.stderr.strip()}", file=sys.stderr)
        return None
    if p.returncode != 0:
        sys.exit(f"cpu_bench: bf16 peak failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}{p.stdout}")
    return kv(p.stdout)["gflops"]


def model_dir(args, name):
    d = os.path.join(args.models, name)
    if not os.path.exists(os.path.join(d, "inputs.safetensors")):
        run([args.blockserve, "example", name, "--out", d], f"example {name}")
    return d


def dtype_flag(args):
    return [] if args.dtype == "fp32" else ["--dtype", args.dtype]


def engine(args, d, inputs=None):
    out = run([args.blockserve, "bench", d, "--inputs", inputs or os.path.join(d, "inputs.safetensors"),
               "--reps", str(args.reps), "--threads", str(args.threads), "--device", "cpu"] + dtype_flag(args),
              f"blockserve bench {d}")
    r = {}
    for line in out.splitlines():
        r.update(kv(line))
    return r


def torch_ref(args, d, dtype=None, reps=None, output=None):
    cmd = [sys.executable, os.path.join(HERE, "torch_ref.py"), d, "--threads", str(args.threads),
           "--reps", str(args.reps if reps is None else reps)]
    if dtype:
        cmd += ["--dtype", dtype]
    if output:
        cmd += ["--output", output]
    out = run(cmd, f"torch_ref {d}")
    return kv(out.strip().splitlines()[-1])


def rel_errors(out, ref):
    """(max|out - ref| / max|ref|, mean|out - ref| / mean|ref|), in float64."""
    import numpy as np
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        sys.exit(f"cpu_bench: output shape {out.shape} is not the reference's {ref.shape}")
    diff = np.abs(out - ref)
    return float(diff.max() / np.abs(ref).max()), float(diff.mean() / np.abs(ref).mean())


def bf16_errors(args, d, torch_out):
    """Errors of blockserve's BF16 output (`blockserve forward --dtype bf16`) and
    of PyTorch's (torch_out, an .npy of the timed module's output) against the
    FP64 reference, computed here in a torch_ref.py subprocess of its own."""
    import numpy as np
    sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
    import st
    tmp = os.path.dirname(torch_out)
    ref_path, bs_path = os.path.join(tmp, "ref_fp64.npy"), os.path.join(tmp, "bs_bf16.safetensors")
    torch_ref(args, d, dtype="fp64", reps=0, output=ref_path)
    run([args.blockserve, "forward", d, "--inputs", os.path.join(d, "inputs.safetensors"), "--output", bs_path,
         "--device", "cpu", "--threads", str(args.threads)] + dtype_flag(args), f"blockserve forward {d}")
    ref = np.load(ref_path)
    bs_out, _ = st.load(bs_path)
    return rel_errors(bs_out["output"].double().numpy(), ref), rel_errors(np.load(torch_out), ref)


def first_sample_inputs(d):
    """Write inputs_b1.safetensors: the first sample of every batched input."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
    import st
    path = os.path.join(d, "inputs_b1.safetensors")
    if not os.path.exists(path):
        t, _ = st.load(os.path.join(d, "inputs.safetensors"))
        st.save(path, {k: (v[:1].contiguous() if v.dim() > 0 else v) for k, v in t.items()})
    return path


def bench_workload(args, name):
    d = model_dir(args, name)
    e = engine(args, d)
    if args.dtype == "fp32":
        t = torch_ref(args, d)
    else:
        tmp = tempfile.mkdtemp(prefix=f"{name}-", dir=args.models)
        try:
            t = torch_ref(args, d, dtype=args.dtype, output=os.path.join(tmp, "torch_out.npy"))
            (bs_err, bs_err_mean), (pt_err, pt_err_mean) = bf16_errors(args, d, os.path.join(tmp, "torch_out.npy"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    flops = e["gflops"] * e["median_ms"] * 1e6
    w = {
        "workload": name, "description": WORKLOADS[name], "matmul_gflop": flops / 1e9,
        "blockserve": {"median_ms": e["median_ms"], "min_ms": e["min_ms"], "max_ms": e["max_ms"],
                       "gflops": e["gflops"], "peak_mb": e.get("peak_mb"), "scratch_mb": e.get("scratch_mb"),
                       "weights_mb": e.get("weights_mb")},
        "torch": {"median_ms": t["median_ms"], "min_ms": t["min_ms"], "max_ms": t["max_ms"],
                  "gflops": flops / (t["median_ms"] * 1e6), "peak_mb": t.get("peak_mb")},
    }
    w["speedup"] = t["median_ms"] / e["median_ms"]
    if args.dtype != "fp32":
        w["blockserve"].update(err=bs_err, err_mean=bs_err_mean)
        w["torch"].update(err=pt_err, err_mean=pt_err_mean)
    if name == "dit_xl_trunk":
        single = engine(args, model_dir(args, "dit_xl_block"), first_sample_inputs(model_dir(args, "dit_xl_block")))
        w["per_block_ms"] = e["median_ms"] / 28
        w["single_block_b1_ms"] = single["median_ms"]
    return w


def judge_bf16(w, peak):
    """--dtype bf16 targets; peak None (no AVX512_BF16): efficiency n/a, no efficiency target."""
    b, t = w["blockserve"], w["torch"]
    w["efficiency"] = None if peak is None else b["gflops"] / peak
    w["targets"] = {f"speedup>={TARGET_SPEEDUP_BF16}": w["speedup"] >= TARGET_SPEEDUP_BF16,
                    "err<=torch": b["err"] <= t["err"],
                    "peak_mb<=torch": b["peak_mb"] is not None and t["peak_mb"] is not None
                    and b["peak_mb"] <= t["peak_mb"]}
    if w["workload"] in GEMM_BOUND and peak is not None:
        w["targets"][f"efficiency>={TARGET_EFFICIENCY:.0%}"] = w["efficiency"] >= TARGET_EFFICIENCY


def judge(w, peak):
    w["efficiency"] = w["blockserve"]["gflops"] / peak
    need = TARGET_SPEEDUP.get(w["workload"], TARGET_SPEEDUP_OTHER)
    bp, tp = w["blockserve"]["peak_mb"], w["torch"]["peak_mb"]
    w["targets"] = {
        f"speedup>={need}": w["speedup"] >= need,
        f"efficiency>={TARGET_EFFICIENCY:.0%}": w["efficiency"] >= TARGET_EFFICIENCY,
        "peak_mb<torch": bp is not None and tp is not None and bp < tp,
    }


def table_bf16(res):
    pk = res["bf16_peak_gflops"]
    if res["bf16_peak"] is None:
        first = f"bf16 peak threads={res['threads']}: unavailable (no AVX512_BF16); efficiency n/a"
    else:
        first = (f"bf16 peak (vdpbf16ps) threads={res['threads']}: {pk[0]:.1f} and {pk[1]:.1f} GFLOP/s "
                 f"(before, after); peak {res['bf16_peak']:.1f}")
    hdr = (f"{'workload':<18} {'bs ms':>9} {'torch ms':>9} {'speedup':>7} {'bs GF/s':>8} {'pt GF/s':>8} "
           f"{'eff':>5} {'bs err':>15} {'pt err':>15} {'bs MB':>7} {'pt MB':>7}  targets")
    lines = [first, "err: max|out-ref|/max|ref| / mean|out-ref|/mean|ref| against FP64", hdr]
    for w in res["workloads"]:
        b, t = w["blockserve"], w["torch"]
        miss = [k for k, ok in w["targets"].items() if not ok]
        eff = "n/a" if w["efficiency"] is None else f"{w['efficiency']:.0%}"
        lines.append(f"{w['workload']:<18} {b['median_ms']:9.1f} {t['median_ms']:9.1f} {w['speedup']:6.2f}x "
                     f"{b['gflops']:8.1f} {t['gflops']:8.1f} {eff:>5} "
                     f"{b['err']:7.1e}/{b['err_mean']:7.1e} {t['err']:7.1e}/{t['err_mean']:7.1e} "
                     f"{b['peak_mb'] or 0:7.0f} {t['peak_mb'] or 0:7.0f}  "
                     f"{'all met' if not miss else 'missed: ' + ', '.join(miss)}")
        if "per_block_ms" in w:
            lines.append(f"{'':<18} per block {w['per_block_ms']:.1f} ms; one dit_xl_block at B1: "
                         f"{w['single_block_b1_ms']:.1f} ms")
    return "\n".join(lines)


def table(res):
    hdr = (f"{'workload':<18} {'bs ms':>9} {'torch ms':>9} {'speedup':>7} {'bs GF/s':>8} {'pt GF/s':>8} "
           f"{'eff':>5} {'bs MB':>7} {'pt MB':>7}  targets")
    lines = [f"sgemm n={res['sgemm_n']} threads={res['threads']}: {res['sgemm_gflops'][0]:.1f} and "
             f"{res['sgemm_gflops'][1]:.1f} GFLOP/s (before, after); peak {res['sgemm_peak']:.1f}", hdr]
    for w in res["workloads"]:
        b, t = w["blockserve"], w["torch"]
        miss = [k for k, ok in w["targets"].items() if not ok]
        lines.append(f"{w['workload']:<18} {b['median_ms']:9.1f} {t['median_ms']:9.1f} {w['speedup']:6.2f}x "
                     f"{b['gflops']:8.1f} {t['gflops']:8.1f} {w['efficiency']:5.0%} {b['peak_mb'] or 0:7.0f} "
                     f"{t['peak_mb'] or 0:7.0f}  {'all met' if not miss else 'missed: ' + ', '.join(miss)}")
        if "per_block_ms" in w:
            lines.append(f"{'':<18} per block {w['per_block_ms']:.1f} ms; one dit_xl_block at B1: "
                         f"{w['single_block_b1_ms']:.1f} ms")
    return "\n".join(lines)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        return m.group(1).strip() if m else platform.machine()
    except OSError:
        return platform.machine()


def git_commit():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def check_json(path):
    with open(path) as f:
        res = json.load(f)
    if res["dtype"] == "bf16":
        assert res["bf16_peak"] is None or res["bf16_peak"] > 0, "bad bf16 peak"
    else:
        assert res["sgemm_peak"] > 0, "no sgemm peak"
    assert res["workloads"], "no workloads"
    for w in res["workloads"]:
        for side in ("blockserve", "torch"):
            assert w[side]["median_ms"] > 0, f"{w['workload']}: {side} median"
            assert w[side]["peak_mb"] is not None and w[side]["peak_mb"] > 0, f"{w['workload']}: {side} peak"
        assert w["matmul_gflop"] > 0 and abs(w["speedup"] - w["torch"]["median_ms"] / w["blockserve"]["median_ms"]) < 1e-9
        assert set(w["targets"]) and all(isinstance(v, bool) for v in w["targets"].values())
        if res["dtype"] == "bf16":
            assert (w["efficiency"] is None) == (res["bf16_peak"] is None), f"{w['workload']}: efficiency"
            for side in ("blockserve", "torch"):
                for k in ("err", "err_mean"):
                    assert 0 <= w[side][k] < float("inf"), f"{w['workload']}: {side} {k}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--models", help="where model directories are written (default BUILD/bench-models)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="compute dtype of both sides (bf16: also errors against FP64)")
    ap.add_argument("--sgemm-n", type=int, default=2048, help="sgemm size (--dtype fp32)")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--check-json", action="store_true", help="validate the JSON written (smoke test)")
    args = ap.parse_args()
    args.build = os.path.abspath(args.build)
    args.blockserve = os.path.join(args.build, "blockserve")
    args.models = args.models or os.path.join(args.build, "bench-models")
    names = [n for n in args.workloads.split(",") if n]
    for n in names:
        if n not in WORKLOADS:
            sys.exit(f"cpu_bench: unknown workload {n} (known: {', '.join(WORKLOADS)})")

    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": git_commit(), "machine": cpu_model(),
           "cpus": os.cpu_count(), "threads": args.threads, "reps": args.reps, "dtype": args.dtype}
    if args.dtype == "fp32":
        res["sgemm_n"] = args.sgemm_n
    res["workloads"] = []
    if args.dtype == "fp32":
        s0 = sgemm(args)
    else:
        p0 = bf16_peak(args)
    for n in names:
        res["workloads"].append(bench_workload(args, n))
        print(f"  {n}: blockserve {res['workloads'][-1]['blockserve']['median_ms']:.1f} ms, "
              f"torch {res['workloads'][-1]['torch']['median_ms']:.1f} ms", file=sys.stderr)
    if args.dtype == "fp32":
        s1 = sgemm(args)
        res["sgemm_gflops"] = [s0["gflops"], s1["gflops"]]
        res["sgemm_peak"] = max(res["sgemm_gflops"])
        for w in res["workloads"]:
            judge(w, res["sgemm_peak"])
        print(table(res))
    else:
        p1 = bf16_peak(args)
        res["bf16_peak_gflops"] = [p0, p1]
        res["bf16_peak"] = None if p0 is None or p1 is None else max(p0, p1)
        for w in res["workloads"]:
            judge_bf16(w, res["bf16_peak"])
        print(table_bf16(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        if args.check_json:
            check_json(args.json)
            print(f"cpu_bench: {args.json} checked")


if __name__ == "__main__":
    main()
