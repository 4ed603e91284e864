"""Model FLOP utilisation of one V-JEPA train step, as a ratio to a large matmul measured in the same process.

One step = target encoder forward on the full volume, context encoder + predictor forward for every mask
configuration, L1 loss, backward, EMA update (no optimizer step). FLOPs are counted with
torch.utils.flop_counter.FlopCounterMode on one step; the reference is the FLOP/s of an fp32 (or bf16)
n x n matmul timed before and after every step, on the same device and threads, so a machine shared with
other work slows both sides of the ratio alike. The ratio printed is the median of the per-step ratios.

FlopCounterMode has no formula for the CPU's attention kernel (aten._scaled_dot_product_flash_attention_for_cpu,
forward and backward): on the CPU its count, the headline ratio, covers the linear layers and the patch
convolution only, as the issue's V-JEPA 2 reference (772 GFLOP a step) does. A second line counts attention too,
with torch's own SDPA formulas registered for the CPU ops (4 * Nq * Nk * head_dim per head forward, 2.5x that
backward), for the utilisation of everything the step computes.

    python benchmarks/model.py                       # CPU, small, 64x128x128 (1024 tokens), batch 2, fp32
    python benchmarks/model.py --size base --shape 64 384 384 --dtype bf16 --device cuda --peak-tflops 989
    OMP_WAIT_POLICY=PASSIVE python benchmarks/model.py   # on a CPU shared with other work: threads that
                                                         # spin at barriers lose their core to the others

Reference point (from the issue): V-JEPA 2's own code on this CPU step (small ViT, 1024 tokens, batch 2, both
mask configurations, predictor 12 x 384) reaches about 0.5 (772 GFLOP a step, 8.4 s a step).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import time

# Run as a script, this file's folder leads sys.path and its name would shadow the `model` package:
# put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

import torch
from torch.utils.flop_counter import FlopCounterMode

from model import SIZES, VJEPA, EncoderConfig, ModelConfig, MultiBlockMasks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128), metavar=("D", "H", "W"))
    p.add_argument("--patch", type=int, nargs=3, default=(4, 16, 16), metavar=("PD", "PH", "PW"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "math"))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the CI machine has 2 cores)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the reference fp32/bf16 matmul")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--peak-tflops", type=float, default=None, help="datasheet peak, to print MFU against it too")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def matmul_flops_per_s(n: int, device: torch.device, dtype: torch.dtype, reps: int = 5) -> tuple[float, float]:
    """(wall, CPU-time) FLOP/s of an n x n @ n x n matmul: the best of `reps` timings after one warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return 2 * n**3 / best, 2 * n**3 / max(best_cpu, 1e-9)


def count_with_cpu_attention(step) -> int:
    """FLOPs of one step with torch's SDPA formulas registered for the CPU attention ops (left out by default)."""
    from torch.utils import flop_counter

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:  # shapes, as torch's sdpa_flop
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    for op, formula in (
        (aten._scaled_dot_product_flash_attention_for_cpu, forward),
        (aten._scaled_dot_product_flash_attention_for_cpu_backward, backward),
    ):
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def build(args: argparse.Namespace, device: torch.device) -> tuple[VJEPA, torch.Tensor, list]:
    enc = EncoderConfig(
        size=args.size,
        patch_size=tuple(args.patch),
        input_shape=tuple(args.shape),
        attn_impl=args.attn,
        activation_checkpointing=args.checkpointing,
    )
    cfg = ModelConfig(encoder=enc)
    model = VJEPA(cfg).to(device)
    masks = MultiBlockMasks(model.grid, cfg.masks)(args.batch, torch.Generator().manual_seed(0))
    masks = [(c.to(device), t.to(device)) for c, t in masks]
    x = torch.randn(args.batch, 1, *args.shape, device=device)
    return model, x, masks


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, x, masks = build(args, device)

    def step() -> None:
        with autocast(device, dtype):
            out = model(x, masks)
        out["loss"].backward()
        model.update_target(0.999)
        for p in model.parameters():
            p.grad = None

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    flops_all = count_with_cpu_attention(step) if device.type == "cpu" else flops
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The matmul reference is re-measured around every step, so a busy machine slows both sides of the ratio.
    times, cpu_times, refs = [], [], [matmul_flops_per_s(args.matmul_n, device, dtype)]
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        refs.append(matmul_flops_per_s(args.matmul_n, device, dtype))
    ratios = [flops / t / ((a[0] + b[0]) / 2) for t, a, b in zip(times, refs, refs[1:])]
    # The same ratio in process CPU time: what the code does with the cycles it gets, whatever else runs.
    cpu_ratios = [flops / t / ((a[1] + b[1]) / 2) for t, a, b in zip(cpu_times, refs, refs[1:])]
    step_s = statistics.median(times)
    peak = statistics.median(r[0] for r in refs)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, whole process
    tokens = args.batch * model.encoder.num_tokens
    all_ratios = [r * flops_all / flops for r in ratios]
    result = {
        "gflop_per_step": flops / 1e9,
        "gflop_per_step_with_attention": flops_all / 1e9,
        "utilisation_with_attention": statistics.median(all_ratios),
        "step_s": step_s,
        "achieved_gflops": flops / step_s / 1e9,
        "matmul_gflops": peak / 1e9,
        "utilisation": statistics.median(ratios),
        "cpu_time_utilisation": statistics.median(cpu_ratios),
        "tokens_per_s": tokens / step_s,
        "peak_mem_gib": peak_mem,
    }
    ctx = ", ".join(f"{len(c[0])}" for c, _ in masks)
    tgt = ", ".join(f"{len(t[0])}" for _, t in masks)
    print(
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} size={args.size} "
        f"shape={tuple(args.shape)} batch={args.batch} tokens/sample={model.encoder.num_tokens} "
        f"context={ctx} targets={tgt} attn={args.attn} checkpointing={args.checkpointing}"
    )
    print(
        f"FLOP per step          {result['gflop_per_step']:.1f} GFLOP (FlopCounterMode; on the CPU without attention)"
    )
    print(f"step time (median {args.steps})  {step_s:.3f} s  {[round(t, 3) for t in times]}")
    print(f"achieved               {result['achieved_gflops']:.1f} GFLOP/s")
    print(f"{args.matmul_n}^2 {args.dtype} matmul   {result['matmul_gflops']:.1f} GFLOP/s (median around the steps)")
    print(
        f"utilisation (ratio)    {result['utilisation']:.3f}   median of per-step ratios "
        f"{[round(r, 3) for r in ratios]} (V-JEPA 2 reference on this CPU step: ~0.5)"
    )
    if device.type == "cpu":
        print(
            f"same, in CPU time       {result['cpu_time_utilisation']:.3f}   {[round(r, 3) for r in cpu_ratios]} "
            "(process CPU seconds; insensitive to other load on the machine)"
        )
        print(
            f"with attention counted  {result['utilisation_with_attention']:.3f}   "
            f"{flops_all / 1e9:.1f} GFLOP per step (the figures above, like the reference, leave out attention: "
            "FlopCounterMode has no formula for the CPU kernel)"
        )
    if args.peak_tflops:
        result["mfu"] = flops / step_s / (args.peak_tflops * 1e12)
        print(f"MFU vs {args.peak_tflops:g} TFLOP/s peak  {result['mfu']:.3f}")
    print(f"tokens/s               {result['tokens_per_s']:.1f}")
    mem_kind = "max allocated" if device.type == "cuda" else "process max RSS"
    print(f"peak memory            {peak_mem:.2f} GiB ({mem_kind})")
    return result


if __name__ == "__main__":
    main()
