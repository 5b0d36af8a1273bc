"""Speed and memory of `jattn.ops.contextual_attention` (not a test).

Case (the DeepFill v1 in-model case): batch 16, features 64x64x128, rate 2, ksize 3,
fuse, a centred 32x32 hole. Prints forward and forward+backward times for the dense and
the blocked path, and their rate in nominal FLOPs,
    2 * N * L * (ksize^2 C + (2 rate)^2 C) per image, N = L = (64 / rate)^2,
next to a `jnp.matmul` with exactly those FLOPs, timed in the same run. Forward+backward
counts 3x the forward's nominal FLOPs (each product's backward is two products of its
size). jattn's scores do about ksize x fewer FLOPs and its paste 4x fewer than the
official algorithm, so the nominal rate may exceed the matmul rate; the actual forward
FLOPs (dense path) are printed too.

Memory: XLA's compiled memory analysis (argument, output and temporary bytes) of the
blocked op at a 2048^2 input (features 512x512x128, rate 2, batch 1), forward and
forward+backward, next to the dense op's (which needs the full 65536^2 score matrix).
`--run-large` also executes the blocked forward there and reports the process's peak RSS.

    python benchmarks/contextual_attention.py [--batch 16] [--repeats 5] [--run-large]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattn._xla import apply_cpu_defaults
from jattn.ops.contextual import contextual_attention

apply_cpu_defaults()  # the `jattn` command's XLA:CPU flags (jattn/_xla.py), before JAX starts a backend


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _inputs(batch: int, size: int, channels: int, hole: int, dtype):
    f = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, channels)), dtype)
    mask = np.zeros((1, size, size, 1), np.float32)
    top = (size - hole) // 2
    mask[:, top : top + hole, top : top + hole] = 1.0
    return f, jnp.asarray(mask)


def _fns(mask, rate, block_size):
    def fwd(f):
        return contextual_attention(f, f, mask, rate=rate, block_size=block_size)[0]

    def loss(f):
        return jnp.mean(jnp.square(fwd(f)))

    return jax.jit(fwd), jax.jit(jax.value_and_grad(loss))


def speed(args) -> dict:
    dtype = jnp.dtype(args.dtype)
    f, mask = _inputs(args.batch, args.size, args.channels, args.hole, dtype)
    n = (args.size // args.rate) ** 2
    k_nominal = args.ksize**2 * args.channels + (2 * args.rate) ** 2 * args.channels
    nominal = 2.0 * args.batch * n * n * k_nominal
    g = args.size // args.rate + 1
    side = args.size // args.rate
    # dense path: scores from 1 x k row windows (query rows padded by k - 1), then the paste
    scores = (side + args.ksize - 1) * side * n * args.ksize * args.channels
    actual = 2.0 * args.batch * (scores + g**4 * args.rate**2 * args.channels)

    a = jnp.asarray(np.random.default_rng(1).standard_normal((args.batch, n, k_nominal)), dtype)
    b = jnp.asarray(np.random.default_rng(2).standard_normal((args.batch, k_nominal, n)), dtype)
    t_matmul = _time(jax.jit(jnp.matmul), a, b, repeats=args.repeats)
    rows = [{"case": "jnp.matmul, same nominal FLOPs", "seconds": t_matmul}]
    for label, block in (("dense", None), (f"blocked {args.block_size}", args.block_size)):
        fwd, fwd_bwd = _fns(mask, args.rate, block)
        rows.append({"case": f"forward, {label}", "seconds": _time(fwd, f, repeats=args.repeats)})
        rows.append({"case": f"forward+backward, {label}", "seconds": _time(fwd_bwd, f, repeats=args.repeats)})
    for row in rows:
        factor = 3.0 if "backward" in row["case"] else 1.0
        row["nominal_gflops"] = factor * nominal / row["seconds"] / 1e9
        row["pct_of_matmul"] = 100.0 * factor * t_matmul / row["seconds"]
    return {"nominal_gflop": nominal / 1e9, "actual_forward_gflop": actual / 1e9, "rows": rows}


def _memory(fn, *args) -> dict:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return {}
    return {
        "argument_mb": analysis.argument_size_in_bytes / 2**20,
        "output_mb": analysis.output_size_in_bytes / 2**20,
        "temp_mb": analysis.temp_size_in_bytes / 2**20,
    }


def memory(args) -> dict:
    size, channels, rate = args.large_size, args.channels, args.rate
    f = jax.ShapeDtypeStruct((1, size, size, channels), jnp.dtype(args.dtype))
    mask = np.zeros((1, size, size, 1), np.float32)
    hole = size // 2
    mask[:, hole // 2 : hole // 2 + hole, hole // 2 : hole // 2 + hole] = 1.0
    mask = jnp.asarray(mask)
    out = {}
    for label, block in (("blocked", args.large_block_size), ("dense", None)):
        fwd, fwd_bwd = _fns(mask, rate, block)
        out[f"forward, {label}"] = _memory(fwd, f)
        out[f"forward+backward, {label}"] = _memory(fwd_bwd, f)
    if args.run_large:
        fwd, _ = _fns(mask, rate, args.large_block_size)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((1, size, size, channels)), jnp.dtype(args.dtype))
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(x))
        out["run_blocked_forward_seconds"] = time.perf_counter() - t0
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--rate", type=int, default=2)
    parser.add_argument("--ksize", type=int, default=3)
    parser.add_argument("--hole", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=256, help="queries per block in the speed case")
    parser.add_argument("--large-size", type=int, default=512, help="feature size of the memory case (2048^2 input)")
    parser.add_argument("--large-block-size", type=int, default=2048)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run-large", action="store_true", help="also execute the blocked op at the large size")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.local_devices()],
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"# jax {result['jax']} on {result['backend']} ({', '.join(result['devices'])})")
    if not args.skip_speed:
        result["speed"] = speed(args)
        sp = result["speed"]
        print(
            f"## speed: B={args.batch}, {args.size}x{args.size}x{args.channels}, rate {args.rate}, "
            f"ksize {args.ksize}, fuse, {args.hole}x{args.hole} hole, {args.dtype}"
        )
        print(f"nominal {sp['nominal_gflop']:.1f} GFLOP per forward (actual {sp['actual_forward_gflop']:.1f})")
        print(f"{'case':<36} {'seconds':>9} {'nominal GFLOP/s':>16} {'% of matmul':>12}")
        for row in sp["rows"]:
            print(f"{row['case']:<36} {row['seconds']:>9.3f} {row['nominal_gflops']:>16.1f} {row['pct_of_matmul']:>11.0f}%")
    result["memory"] = memory(args)
    print(
        f"## memory: features {args.large_size}x{args.large_size}x{args.channels} "
        f"(a {args.large_size * 4}^2 image in DeepFill), rate {args.rate}, batch 1, block {args.large_block_size}"
    )
    for case, mem in result["memory"].items():
        if isinstance(mem, dict):
            print(f"{case:<28} " + ", ".join(f"{k} {v:,.0f}" for k, v in mem.items()))
        else:
            print(f"{case:<28} {mem:,.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
