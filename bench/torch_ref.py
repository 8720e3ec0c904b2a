"""PyTorch side of the CPU benchmark: time one model directory's forward with
the reference modules of tests/reference (the diffusers formulation) on the
inputs blockserve's `example` wrote next to it.

    /usr/bin/python3 bench/torch_ref.py MODEL_DIR --threads 2 --reps 5

Prints one line of key=value pairs (median_ms, min_ms, max_ms, peak_mb,
base_mb); memory is measured as in `blockserve bench`: the peak RSS during the
forwards over the RSS after `import torch`.
"""
import argparse
import json
import os
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import blocks  # noqa: E402
import st  # noqa: E402


def status_mb(field):
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) / 1024.0 if m else -1.0


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    base = status_mb("VmRSS")
    with open(os.path.join(args.model_dir, "config.json")) as f:
        config = json.load(f)
    weights, _ = st.load(os.path.join(args.model_dir, "diffusion_pytorch_model.safetensors"))
    model = blocks.build_model(config, weights)
    del weights  # the module holds its own copy, as a served model would
    inputs, _ = st.load(os.path.join(args.model_dir, "inputs.safetensors"))
    peak_ok = reset_peak()

    times = []
    blocks.run_model(model, config["_class_name"], inputs)  # warm-up
    for _ in range(args.reps):
        t0 = time.perf_counter()
        blocks.run_model(model, config["_class_name"], inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    n = len(times)
    med = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
    out = f"torch={torch.__version__} threads={torch.get_num_threads()} reps={n} "
    out += f"median_ms={med:.3f} min_ms={times[0]:.3f} max_ms={times[-1]:.3f}"
    if peak_ok:
        out += f" peak_mb={status_mb('VmHWM') - base:.1f} base_mb={base:.1f}"
    print(out)


if __name__ == "__main__":
    main()
