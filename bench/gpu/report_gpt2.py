#!/usr/bin/env python3
"""GPU training of GPT-2 small with MoE FFNs: bench_gpt2_cuda's Google Benchmark JSON and
torch_gpt2_cuda.py's JSON in, a markdown table out, the issue's targets last.

  python3 bench/gpu/report_gpt2.py build-gpu/results/gpt2_cuda.json build-gpu/results/torch_gpt2_cuda.json

The torch file is optional (its columns then read "-"). Ours: Train/<variant>/bf16 (and tf32,
listed for orientation); tokens/s over the timed steps, MFU against the bf16 GEMM peak the same
binary measured (Peak/bf16_gemm). Torch: its eager and torch.compile entries in bf16 autocast, MFU
against the torch.mm peak it measured. Both sides use the same FLOPs per token.

Targets (issue 6, self-routing, bf16): >= 1.3x PyTorch eager's tokens/s, >= 1.0x torch.compile's,
MFU >= 35%.
"""
import json
import sys

import gbench

VARIANTS = ["self", "linear", "dense"]
TARGET_VARIANT = "self"


def load_ours(path):
    """(variant, precision) -> counters (or {"error": text}); the bf16 GEMM peak in TFLOP/s; the
    run's context; a note when the file was cut short. With repetitions, their median aggregate."""
    records, context, note = gbench.read_runs(path)
    rows, peak = {}, None
    for b in records:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue  # mean, stddev, cv: the median stands for the repetitions
        parts = gbench.name_parts(b)
        if parts and parts[0] == "Peak":
            peak = b.get("tflops", peak)
        elif parts and parts[0] == "Train" and len(parts) >= 3:
            rows[(parts[1], parts[2])] = {"error": b.get("error_message")} if b.get("error_occurred") else b
        elif parts and parts[0] == "Attention" and len(parts) >= 4:  # Attention/<kernel>/bf16/<pass>
            rows[("attention", parts[1], parts[3])] = {"error": b.get("error_message")} if b.get("error_occurred") else b
    return rows, peak, context, note


# Train rows of self with a device setting other than its default, against self/bf16 of the same run.
DEVICE_SETTINGS = (
    ("self_dgelu_transposed", "self with DgeluWeights::transposed (the backward through the GELU over W2's transposes)"),
    ("self_grouped", "self with ExpertGemm::grouped (the experts' forward products from the routing plan, no host "
                     "wait in the forward)"),
)


def print_device_settings(ours):
    base_tps = (ours.get(("self", "bf16")) or {}).get("tokens/s")
    for variant, description in DEVICE_SETTINGS:
        other = ours.get((variant, "bf16"))
        if other is None:
            continue
        print()
        if "error" in other:
            print(f"{description}: error: {other['error']}")
            continue
        tps = other.get("tokens/s")
        gain = f" ({tps / base_tps:.3f}x self's {fmt(base_tps)})" if tps and base_tps else ""
        print(f"{description}: {fmt(tps)} tokens/s, step {fmt(other.get('step_ms'), '{:.1f}')} ms{gain}")


def load_torch(path):
    if not path:
        return {}, None, None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}, None, None
    entries = {(e["variant"], e["mode"]): e for e in data.get("entries", [])}
    batch = data.get("batch") or {}
    return entries, (data.get("peak") or {}).get("tflops"), step_shape(batch.get("sequences"), batch.get("accumulation"))


def step_shape(sequences, accumulation):
    """A step's sequences as the reports print them: "8", or "16 x 4" with gradient accumulation; None if unknown."""
    if sequences is None:
        return None
    a = int(accumulation or 1)
    return f"{int(sequences)}" + (f" x {a}" if a > 1 else "")


def fmt(value, spec="{:,.0f}"):
    return "-" if value is None else spec.format(value)


PHASES = ["zero_grad", "forward", "backward", "clip", "adamw"]


def print_phases(ours):
    """One step's phases, host ms / device ms (bench_gpt2_cuda's time_phases), where they were measured."""
    rows = [(key, r) for key, r in sorted(ours.items()) if "error" not in r and r.get("forward_gpu_ms") is not None]
    if not rows:
        return
    print()
    print("One step's phases, host ms / device ms (the device span includes the GPU's waits on the host):")
    print()
    print("| variant | precision | " + " | ".join(PHASES) + " |")
    print("|---|---|" + "---:|" * len(PHASES))
    for (variant, precision), r in rows:
        cells = [f"{fmt(r.get(p + '_host_ms'), '{:.1f}')} / {fmt(r.get(p + '_gpu_ms'), '{:.1f}')}" for p in PHASES]
        print(f"| {variant} | {precision} | " + " | ".join(cells) + " |")


HOST_CALLS = gbench.HOST_CALLS


def print_attention(ours):
    """One layer's attention alone: the fused kernel against the materialised one (ms, TFLOP/s, cache MiB)."""
    passes = [p for p in ("fwd", "fwdbwd") if any(("attention", k, p) in ours for k in ("fused", "materialized"))]
    if not passes:
        return
    print()
    print("One layer's causal attention (bf16, GPT-2 small's shape), ms [TFLOP/s], and what it keeps for backward:")
    print()
    print("| pass | fused | materialized | fused gain | fused cache MiB | materialized cache MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for p in passes:
        fused, mat = ours.get(("attention", "fused", p)) or {}, ours.get(("attention", "materialized", p)) or {}

        def cell(r):
            if "error" in r:
                return "error: " + str(r["error"])[:60]
            if "real_time" not in r:
                return "-"
            return f"{r['real_time']:.3f} [{fmt(r.get('tflops'), '{:.0f}')}]"

        gain = mat["real_time"] / fused["real_time"] if fused.get("real_time") and mat.get("real_time") else None
        print(f"| {p} | {cell(fused)} | {cell(mat)} | {fmt(gain, '{:.2f}x')} | {fmt(fused.get('cache_mib'), '{:.0f}')} "
              f"| {fmt(mat.get('cache_mib'), '{:.0f}')} |")


def print_host_calls(ours):
    """The timed phases' step, host time in the device's calls by kind (moe/cuda/host_times.hpp):
    ms over calls, and the longest call's ms, where they were measured."""
    rows = [(key, r) for key, r in sorted(ours.items()) if "error" not in r and r.get("host_calls_ms") is not None]
    if not rows:
        return
    print()
    print("The same step's host time in device calls, ms (calls) [longest call ms]; lt_heuristic is part of "
          "gemm_lt, wait is the GPU's lead:")
    print()
    print("| variant | precision | host ms | in calls | " + " | ".join(HOST_CALLS) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(HOST_CALLS))
    for (variant, precision), r in rows:
        step = sum(r.get(p + "_host_ms") or 0 for p in PHASES)
        cells = [f"{fmt(r.get(f'host_{k}_ms'), '{:.1f}')} ({fmt(r.get(f'host_{k}_calls'))}) "
                 f"[{fmt(r.get(f'host_{k}_max_ms'), '{:.2f}')}]" for k in HOST_CALLS]
        print(f"| {variant} | {precision} | {step:.1f} | {fmt(r.get('host_calls_ms'), '{:.1f}')} | "
              + " | ".join(cells) + " |")


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(argv) >= 2 else 2
    ours, peak, context, note = load_ours(argv[1])
    torch_entries, torch_peak, torch_batch = load_torch(argv[2] if len(argv) > 2 else None)
    if note:
        print(f"({note})\n")

    print(f"GPT-2 small MoE training on the GPU ({context.get('gpu', context.get('host_name', '?'))}); bf16 GEMM peak: ours "
          f"{fmt(peak, '{:.0f}')} TFLOP/s, torch {fmt(torch_peak, '{:.0f}')} TFLOP/s; our training steps' attention: "
          f"{context.get('attention', '?')}")
    ours_batch = next((step_shape(r.get("batch"), r.get("accumulation"))
                       for key, r in ours.items() if key[0] in VARIANTS and "batch" in r), None)
    print(f"Batch (sequences x micro-batches a step): ours {ours_batch or '-'} x 1024 tokens, "
          f"torch {torch_batch or '-'} x 1024 tokens"
          + (" (NOT the same: the x eager / x compile columns compare unlike steps)"
             if ours_batch and torch_batch and ours_batch != torch_batch else ""))
    print()
    print("| variant | precision | ours tokens/s | step ms | MFU | device GiB | peak GiB ours / eager | torch eager "
          "| torch compile | x eager | x compile |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    # The targets' figures: None ("-", NOT met) unless the self/bf16 row ran.
    x_eager_target = x_compile_target = mfu_target = None
    for precision in ("bf16", "tf32"):
        for variant in VARIANTS:
            r = ours.get((variant, precision))
            if r is None:
                continue
            if "error" in r:
                print(f"| {variant} | {precision} | error: {r['error']} | | | | | | | | |")
                continue
            tps = r.get("tokens/s")
            eager_entry = (torch_entries.get((variant, "eager")) or {}) if precision == "bf16" else {}
            eager = eager_entry.get("tokens_per_s")
            compiled = (torch_entries.get((variant, "compile")) or {}).get("tokens_per_s") if precision == "bf16" else None
            x_eager = tps / eager if tps and eager else None
            x_compile = tps / compiled if tps and compiled else None
            mfu = r.get("mfu")
            print(f"| {variant} | {precision} | {fmt(tps)} | {fmt(r.get('step_ms'), '{:.1f}')} | "
                  f"{fmt(None if mfu is None else 100 * mfu, '{:.1f}%')} | {fmt(r.get('device_gib'), '{:.1f}')} | "
                  f"{fmt(r.get('peak_gib'), '{:.1f}')} / {fmt(eager_entry.get('peak_memory_gib'), '{:.1f}')} | "
                  f"{fmt(eager)} | {fmt(compiled)} | {fmt(x_eager, '{:.2f}x')} | {fmt(x_compile, '{:.2f}x')} |")
            if variant == TARGET_VARIANT and precision == "bf16":
                x_eager_target, x_compile_target, mfu_target = x_eager, x_compile, mfu
    print_device_settings(ours)
    verdicts = [
        (">= 1.3x PyTorch eager", x_eager_target, x_eager_target is not None and x_eager_target >= 1.3),
        (">= 1.0x torch.compile", x_compile_target, x_compile_target is not None and x_compile_target >= 1.0),
        ("MFU >= 35%", mfu_target, mfu_target is not None and mfu_target >= 0.35),
    ]
    print_phases(ours)
    print_host_calls(ours)
    print_attention(ours)
    for (variant, mode), e in sorted(torch_entries.items()):
        if e.get("error"):  # two lines: inductor's first line only says which backend failed
            print(f"\ntorch {variant}/{mode}: {' / '.join(e['error'].splitlines()[:2])[:400]}")
    print()
    print(f"Targets ({TARGET_VARIANT}, bf16):")
    for text, value, met in verdicts:
        shown = "-" if value is None else (f"{100 * value:.1f}%" if "MFU" in text else f"{value:.2f}x")
        print(f"  {text}: {shown}  {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
