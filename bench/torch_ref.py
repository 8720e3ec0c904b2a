"""PyTorch side of the CPU benchmark: time one model directory's forward with
the reference modules of tests/reference (the diffusers formulation) on the
inputs blockserve's `example` wrote next to it.

    /usr/bin/python3 bench/torch_ref.py MODEL_DIR --threads 2 --reps 5
                                        [--dtype fp32|bf16|fp64] [--inputs IN]
                                        [--output OUT.npy]

--dtype fp32 (the default) runs tests/reference's modules as they are
(blocks.run_model). bf16 and fp64 cast the built module with
`module.to(dtype)` and the floating-point activation inputs (hidden_states,
encoder_hidden_states, x, emb) to that dtype; timesteps, labels and masks go
in as the modules take them. The modules keep their diffusers-style float32
islands in every dtype: the softmax, the mask bias and the timestep sinusoid
are computed in float32 (so the fp64 output, the error benchmark's reference,
carries float32 rounding there, ~1e-7 relative, far below BF16's 2^-9). The
timed call includes the input casts and the output's cast to float32 (fp64:
float64), as blocks.run_model does. --reps 0 runs one untimed forward (for
writing a reference with --output) and prints no times.

Prints one line of key=value pairs (dtype, median_ms, min_ms, max_ms, peak_mb,
base_mb); memory is measured as in `blockserve bench`: the peak RSS during the
forwards over the RSS after `import torch`. With bf16/fp64 the float32 copy of
the module that the cast replaces is freed and malloc_trim'd before the peak is
reset, so the peak counts the weights in the compute dtype. --output writes the
last forward's output as a float64 .npy array after the peak has been read.
"""
import argparse
import ctypes
import gc
import json
import os
import re
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import blocks  # noqa: E402
import st  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


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


def release_freed_memory():
    """Return freed heap memory to the OS so that RSS counts live tensors only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_model_as(model, class_name, inputs, dtype):
    """blocks.run_model with the float activations cast to dtype instead of
    float32; returns the output as float32 (float64 when dtype is float64)."""
    if dtype == torch.float32:
        return blocks.run_model(model, class_name, inputs)
    names = blocks.INPUT_NAMES[class_name]
    unknown = set(inputs) - set(names)
    if unknown:
        raise ValueError(f"unexpected inputs for {class_name}: {sorted(unknown)}")
    if names[0] not in inputs:
        raise ValueError(f"{class_name} needs input {names[0]}")
    args = {k: (v.to(dtype) if k in blocks.FLOAT_INPUTS else v) for k, v in inputs.items()}
    with torch.no_grad():
        if class_name == "AdaLayerNorm":
            out = model(args["hidden_states"], args["timestep"])
        elif class_name == "AdaGroupNorm":
            out = model(args["x"], args["emb"])
        elif class_name != "BasicTransformerBlock":
            out = model(args["hidden_states"])
        else:
            out = model(**args)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return out.to(out_dtype).contiguous()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="timed forwards after one warm-up (0: one untimed forward)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--inputs", help="inputs file (default MODEL_DIR/inputs.safetensors)")
    ap.add_argument("--output", help="write the last forward's output here as a float64 .npy array")
    args = ap.parse_args()
    if args.reps < 0:
        ap.error("--reps must be >= 0")
    dtype = DTYPES[args.dtype]

    torch.set_num_threads(args.threads)
    base = status_mb("VmRSS")
    with open(os.path.join(args.model_dir, "config.json")) as f:
        config = json.load(f)
    weights, _ = st.load(os.path.join(args.model_dir, "diffusion_pytorch_model.safetensors"))
    model = blocks.build_model(config, weights)
    del weights  # the module holds its own copy, as a served model would
    if dtype != torch.float32:
        model = model.to(dtype)  # parameter by parameter; each float32 one is freed as it is replaced
        release_freed_memory()
    inputs, _ = st.load(args.inputs or os.path.join(args.model_dir, "inputs.safetensors"))
    peak_ok = reset_peak()
    cls = config["_class_name"]

    times = []
    out = None
    if args.reps == 0:
        out = run_model_as(model, cls, inputs, dtype)
    else:
        run_model_as(model, cls, inputs, dtype)  # warm-up
    for _ in range(args.reps):
        out = None  # as in fp32: no earlier output held during a forward
        t0 = time.perf_counter()
        out = run_model_as(model, cls, inputs, dtype)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = status_mb("VmHWM") - base
    line = f"torch={torch.__version__} threads={torch.get_num_threads()} "
    if args.dtype != "fp32":
        line += f"dtype={args.dtype} "
    line += f"reps={len(times)}"
    if times:
        times.sort()
        n = len(times)
        med = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
        line += f" median_ms={med:.3f} min_ms={times[0]:.3f} max_ms={times[-1]:.3f}"
    if peak_ok:
        line += f" peak_mb={peak:.1f} base_mb={base:.1f}"
    if args.output:
        np.save(args.output, out.to(torch.float64).numpy())
    print(line)


if __name__ == "__main__":
    main()
