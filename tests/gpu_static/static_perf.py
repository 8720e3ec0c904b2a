#!/usr/bin/env python3
"""A static performance model of attn_mma's inner loop (label gpu_static,
issue 14 item 8): no GPU, figures from the compiled kernel and the bank model.

usage: static_perf.py --ptx ATTN_CUDA_SM90_PTX --banks GPU_STATIC_BANKS

- Instructions per HMMA: ptx_loops.py finds the loops of the sm_90 PTX of
  each attn_mma<__nv_bfloat16, DP, WARPS, false> instance (ptxas_gate.py
  --save-ptx keeps it) that hold mma.sync. attn_mma has two: the key loop
  over full tiles without a mask and the one with a mask (the last tile,
  with its bounds checks, runs after the loop). The loop with the fewest
  instructions per mma is the unmasked one, the other the masked one. The
  count is static PTX (both sides of a branch inside the loop count; PTX
  instructions, which ptxas maps to SASS roughly one to one for this code
  but not exactly: no SASS disassembler is installed here).
- Shared-memory wavefronts per HMMA: the "perf" lines of gpu_static_banks
  (the bank model applied to the kernel's own index expressions).
- The throughput they imply on an H200 (an estimate, never measured: no
  GPU ran this kernel), per SM and clock, the least of:
    tensor cores: HMMA_PER_CLK m16n8k16 (4096 flops each) through mma.sync;
    issue: ISSUE_PER_CLK warp instructions over instructions per HMMA;
    shared memory: 1 wavefront (128 bytes) a clock over wavefronts per HMMA;
  times SMS x CLOCK_GHZ x 4096 flops, times DP's useful share of the head
  dim. The constants and where each comes from are below.

Fails (exit 1) when an instance's instructions per HMMA or wavefronts per
HMMA exceed the documented thresholds (MAX_INSTR, MAX_WAVEFRONTS), or the
loops cannot be found. Exit 77 (skipped) without the PTX (no nvcc)."""
import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ptx_loops  # noqa: E402

# ---- the H200 (SXM) -----------------------------------------------------------
# 132 SMs: GH100 as in the H100 SXM5 (NVIDIA H100 Tensor Core GPU Architecture
# whitepaper, "H100 SXM5": 132 SMs, 4 fourth-generation tensor cores an SM);
# the H200 is the same GPU with HBM3e (NVIDIA H200 datasheet).
SMS = 132
# 1.83 GHz: the clock of NVIDIA's dense BF16 figure, 989.4 TFLOP/s for H100
# SXM and H200 (datasheets) = 132 SMs x 4096 flop/clock/SM x 1.83 GHz.
CLOCK_GHZ = 1.83
PEAK_FLOP_PER_CLK_SM = 4096  # dense BF16 with wgmma: 989.4e12 / (132 x 1.83e9)
# Issue: 4 sub-partitions (SMSPs) an SM, each issuing one warp instruction a
# clock (the whitepaper's SM diagram: 4 processing blocks, one warp scheduler
# and dispatch unit each).
ISSUE_PER_CLK = 4.0
# mma.sync on Hopper: the full tensor rate is reachable only through wgmma
# (FlashAttention-3, arXiv:2407.08608, section 2: FlashAttention-2, built on
# mma.sync, reaches about 35% of H100's peak; Luo et al., "Dissecting the
# NVIDIA Hopper Architecture through Microbenchmarking", arXiv:2501.12084,
# measure mma.sync below wgmma). ASSUMPTION of this model: mma.sync
# m16n8k16 runs at half the wgmma rate, 2048 flop/clock/SM, i.e. 0.5 HMMA
# (4096 flops) a clock per SM. Not measured here.
HMMA_PER_CLK = 0.5
FLOP_PER_HMMA = 2 * 16 * 8 * 16
# Shared memory: 128 bytes (one wavefront) a clock per SM (32 banks of 4 bytes).
WAVEFRONTS_PER_CLK = 1.0

# ---- thresholds (the build fails past them) and the kernel before ----------------
# Measured by this script on the sm_90 PTX of this kernel (bf16, uniform):
# instructions per HMMA of the unmasked loop and wavefronts per HMMA, with a
# margin of about 10% on the instructions; and of the kernel before the
# rebuild (commit f13fbe3, whose only loop held the mask and the bounds
# checks: its one figure is both), by the same script on that commit's PTX
# and the same bank model (old_mma in static_banks.cc).
INSTANCES = [(64, 4), (128, 4), (64, 8), (80, 8), (160, 4)]
# Measured: 7.16 (DP 64, 4 and 8 warps), 5.09 (128), 7.51 (80, 8 warps),
# 5.08 (160); wavefronts 2.5 (4 warps), 2.25 (8 warps).
MAX_INSTR = {(64, 4): 7.9, (128, 4): 5.6, (64, 8): 7.9, (80, 8): 8.3, (160, 4): 5.6}
MAX_WAVEFRONTS = 2.5
# The kernel before: its loop's static count (its tile loads were inner
# loops, counted once here though they ran several times a tile).
BEFORE_INSTR = {(64, 4): 28.36, (128, 4): 16.05, (64, 8): 28.36, (80, 8): 23.44, (160, 4): 13.59}


def mangled(dp, warps):
    """attn_mma<__nv_bfloat16, dp, warps, false, __nv_bfloat16>: BF16 output,
    the engine's narrow o (the F32-output instance has the same loop)."""
    return "_Z8attn_mmaI13__nv_bfloat16Li%dELi%dELb0ES0_Ev9attn_args" % (dp, warps)


def tflops(instr, wf, dp, hd):
    rate = min(HMMA_PER_CLK, ISSUE_PER_CLK / instr, WAVEFRONTS_PER_CLK / wf)
    bound = ("tensor" if rate == HMMA_PER_CLK else
             "issue" if rate == ISSUE_PER_CLK / instr else "shared memory")
    return rate * FLOP_PER_HMMA * SMS * CLOCK_GHZ * 1e9 / 1e12 * hd / dp, bound


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ptx", required=True)
    ap.add_argument("--banks", required=True)
    args = ap.parse_args()
    if not os.path.exists(args.ptx):
        print("SKIP: no %s (gpu_static_ptxas saves it; it needs nvcc)" % args.ptx)
        return 77
    bank = subprocess.run([args.banks], stdout=subprocess.PIPE, text=True).stdout
    wfs, wfs_mask, wfs_old = {}, {}, {}
    for m in re.finditer(r"perf attn_mma DP(\d+)/(\d+)w: wavefronts_per_hmma ([\d.]+) "
                         r"\(mask \[B,Lq,Lk\] ([\d.]+); before the rebuild ([\d.]+)", bank):
        k = (int(m.group(1)), int(m.group(2)))
        wfs[k], wfs_mask[k], wfs_old[k] = (float(m.group(i)) for i in (3, 4, 5))
    ents = ptx_loops.entries(open(args.ptx).read())
    print("model (H200, estimates, no GPU ran this): %d SMs x %.2f GHz; per SM and clock: %.1f "
          "HMMA m16n8k16 by mma.sync (assumed), %.0f warp instructions issued, %.0f shared-memory "
          "wavefront" % (SMS, CLOCK_GHZ, HMMA_PER_CLK, ISSUE_PER_CLK, WAVEFRONTS_PER_CLK))
    print("%-22s %14s %14s %14s %12s %24s %20s" % (
        "attn_mma bf16", "instr/HMMA", "masked", "before", "wavefr/HMMA", "before", "TFLOP/s (bound)"))
    failed = 0
    for dp, w in INSTANCES:
        name = mangled(dp, w)
        if name not in ents or (dp, w) not in wfs:
            print("FAIL: attn_mma<bf16, %d, %d, false>: no PTX entry or bank figures" % (dp, w))
            failed += 1
            continue
        loops = sorted(ptx_loops.mma_loops(ents[name]), key=lambda x: x[0] / x[1])
        if len(loops) < 1:
            print("FAIL: attn_mma<bf16, %d, %d, false>: no loop with mma found" % (dp, w))
            failed += 1
            continue
        n, mma, kinds = loops[0]
        instr = n / mma
        masked = loops[-1][0] / loops[-1][1]
        wf = wfs[(dp, w)]
        hd = {64: 64, 128: 128, 80: 72, 160: 160}[dp]
        t, bound = tflops(instr, wf, dp, dp)
        before = BEFORE_INSTR.get((dp, w))
        t_old = ""
        if before:
            to, bo = tflops(before, wfs_old[(dp, w)], dp, dp)
            t_old = " (before: %.0f, %s)" % (to, bo)
        print("DP%-3d %dw %12s %10.2f %14.2f %14s %12.3f %14.3f %10s %.0f (%s)%s" % (
            dp, w, "", instr, masked, "%.2f" % before if before else "-", wf, wfs_old[(dp, w)],
            "", t, bound, t_old))
        print("        unmasked loop: %d instructions, %d mma: %s" % (n, mma, dict(kinds)))
        if dp == 80:
            print("        (head dim 72 on DP 80: %.0f TFLOP/s of useful flops)" %
                  tflops(instr, wf, dp, hd)[0])
        if instr > MAX_INSTR[(dp, w)]:
            print("FAIL: attn_mma<bf16, %d, %d>: %.2f instructions per HMMA, documented at most "
                  "%.2f" % (dp, w, instr, MAX_INSTR[(dp, w)]))
            failed += 1
        if wf > MAX_WAVEFRONTS:
            print("FAIL: attn_mma<bf16, %d, %d>: %.3f wavefronts per HMMA, documented at most "
                  "%.2f" % (dp, w, wf, MAX_WAVEFRONTS))
            failed += 1
    print("FAIL" if failed else "inner loop within the documented figures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
