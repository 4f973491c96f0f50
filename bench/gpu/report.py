#!/usr/bin/env python3
"""The GPU comparison: bench_moe_cuda's Google Benchmark JSON and torch_moe_cuda.py's JSON in,
markdown out, the table of targets last.

  python3 bench/gpu/report.py build-gpu/results/moe_cuda.json build-gpu/results/torch_cuda.json

The torch file is optional (its columns then read "-"). Times are medians: of the repetitions'
per-iteration means when bench_moe_cuda ran with --benchmark_repetitions (its "median"
aggregate), of torch's timed iterations otherwise. The forwards compared are inference forwards
on both sides: torch's under torch.no_grad(), ours with ForwardOptions::for_backward = false
(moe_fwd; moe_fwd_train, the forward that keeps what backward needs, is listed beside it).

Targets (bf16, the issue's): our SelfRoute forward within 1.15x of the dense cuBLAS floor at
T=16384 and for Mixtral; >= 1.5x faster than torch._grouped_mm at T=16384 and >= 2x at T=1024;
forward + backward >= 3x faster than the eager torch loop at T=16384; routing + dispatch < 5% of
the forward at T=16384.
"""
import json
import statistics
import sys

import gbench

SHAPES = ["gpt2_T16384", "gpt2_T1024", "mixtral_T4096"]
PRECISIONS = ["bf16", "fp32", "tf32"]
TORCH_PRECISION = "bf16"  # the torch peers run in bf16 only
UNIT_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}

# (column, shape) -> (test, text); only for bf16 rows.
TARGETS = {
    ("ratio", "gpt2_T16384"): (lambda v: v <= 1.15, "<= 1.15"),
    ("ratio", "mixtral_T4096"): (lambda v: v <= 1.15, "<= 1.15"),
    ("vs_grouped", "gpt2_T16384"): (lambda v: v >= 1.5, ">= 1.5x"),
    ("vs_grouped", "gpt2_T1024"): (lambda v: v >= 2.0, ">= 2x"),
    ("vs_loop", "gpt2_T16384"): (lambda v: v >= 3.0, ">= 3x"),
    ("share", "gpt2_T16384"): (lambda v: v < 0.05, "< 5%"),
}


def load_ours(path):
    """(what, shape, precision) -> median ms; the same key -> error message; the run's context;
    a note when the file was cut short."""
    records, context, note = gbench.read_runs(path)
    runs, medians, errors = {}, {}, {}
    for b in records:
        key = gbench.name_parts(b)
        if len(key) != 3:
            continue
        if b.get("error_occurred"):
            errors[key] = b.get("error_message", "error")
            continue
        ms = float(b["real_time"]) * UNIT_MS[b.get("time_unit", "ns")]  # manual (event) time
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[key] = ms
        else:
            runs.setdefault(key, []).append(ms)
    times = {key: statistics.median(v) for key, v in runs.items()}
    times.update(medians)
    return times, errors, context, note


HOST_CALLS = gbench.HOST_CALLS


def load_host_calls(path):
    """(what, shape, precision) -> the host-call counters of its row (bench/gpu/host_counters.hpp:
    per call, the same in every repetition's record), for the rows that have them."""
    records, _, _ = gbench.read_runs(path)
    hosts = {}
    for b in records:
        key = gbench.name_parts(b)
        if len(key) == 3 and not b.get("error_occurred") and b.get("host_calls_ms") is not None:
            hosts.setdefault(key, b)
    return hosts


def print_host_calls(hosts):
    """Host ms per call by kind of device call, (calls per call), for the layer's rows."""
    rows = []
    for (what, shape, prec), b in sorted(hosts.items()):
        cells = [f"{b.get(f'host_{k}_ms', 0):.3f} ({b.get(f'host_{k}_calls', 0):g})" for k in HOST_CALLS]
        rows.append([f"{what}/{shape}/{prec}", f"{b['host_calls_ms']:.3f}"] + cells)
    if not rows:
        return
    print("Host time per call in the device's calls, ms (calls); lt_heuristic is part of gemm_lt, wait is the "
          "offsets' sync (the GPU's lead):")
    print()
    print(table(["benchmark", "in calls"] + HOST_CALLS, rows))
    print()


# bench_moe_cuda's expert_gemm rows: GPT-2's H and F; the products in the order they are listed.
EXPERT_GEMM_H, EXPERT_GEMM_F = 768, 3072
EXPERT_GEMM_PRODUCTS = ["gelu_fwd", "bias_fwd", "dgelu_nn", "dgelu_tn", "dgelu_split", "plain_nn", "plain_tn"]


def print_expert_gemms(times, errors):
    """One expert's products alone (expert_gemm/<product>_R<rows>/bf16): us and TFLOP/s from the median time."""
    found = {}
    for (what, case, prec), ms in times.items():
        product, _, rows = case.rpartition("_R")
        if what == "expert_gemm" and prec == "bf16" and rows.isdigit():
            found[(product, int(rows))] = ms
    failed = {case: message for (what, case, _), message in errors.items() if what == "expert_gemm"}
    if not found and not failed:
        return
    all_rows = sorted({r for _, r in found})
    order = {p: i for i, p in enumerate(EXPERT_GEMM_PRODUCTS)}
    rows = []
    for product in sorted({p for p, _ in found}, key=lambda p: (order.get(p, len(order)), p)):
        cells = [product]
        for r in all_rows:
            ms = found.get((product, r))
            flops = 2.0 * r * EXPERT_GEMM_H * EXPERT_GEMM_F
            cells += ["-", "-"] if ms is None else [f"{1000 * ms:.1f}", f"{flops / (ms * 1e-3) / 1e12:.0f}"]
        rows.append(cells)
    print(f"One expert's products alone, bf16, H={EXPERT_GEMM_H} F={EXPERT_GEMM_F} (median us and TFLOP/s; "
          "nn / tn: W2 as the layer keeps it, [H, F], or its transpose):")
    print()
    print(table(["product"] + [f"{h} R={r}" for r in all_rows for h in ("us", "TFLOP/s")], rows))
    print()
    for case, message in sorted(failed.items()):
        print(f"- bench_moe_cuda expert_gemm/{case}/bf16: {message}")
    if failed:
        print()


# bench_moe_cuda's expert_product rows: expert_product/<first|second>/<way>/<shape>/bf16.
EXPERT_PRODUCT_WAYS = ["grouped_128x4", "grouped_128x4_swiglu", "grouped_128x4_combine", "grouped_256x4", "grouped_128x3x2", "cublas_experts",
                       "cublas_dense"]


def load_expert_products(path):
    """{(shape, product, way): [(ms, TFLOP/s), ...]} of the expert_product rows (medians of
    repetitions only), and the failed rows' lines."""
    records, _, _ = gbench.read_runs(path)
    found, failed = {}, []
    for b in records:
        key = gbench.name_parts(b)
        if len(key) != 5 or key[0] != "expert_product":
            continue
        _, product, way, shape, _ = key
        if b.get("error_occurred"):
            failed.append(f"- bench_moe_cuda {'/'.join(key)}: {b.get('error_message', 'error')}")
            continue
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        ms = float(b["real_time"]) * UNIT_MS[b.get("time_unit", "ns")]
        found.setdefault((shape, product, way), []).append((ms, b.get("TFLOP/s")))
    return found, failed


def expert_product_ms(found, shape, product, way):
    runs = found.get((shape, product, way))
    return statistics.median(ms for ms, _ in runs) if runs else None


def print_expert_products(found, failed):
    """The expert bank's two products over a routed layer, by way: median us, TFLOP/s, and the
    time against cublas_experts (the layer's path today) and cublas_dense (the product's floor)."""
    if not found and not failed:
        return
    order = {w: i for i, w in enumerate(EXPERT_PRODUCT_WAYS)}
    rows = []
    for shape in SHAPES:
        for product in ("first", "second"):
            ways = sorted({w for (s, p, w) in found if s == shape and p == product}, key=lambda w: order.get(w, 99))
            median = {w: statistics.median(ms for ms, _ in found[(shape, product, w)]) for w in ways}
            for way in ways:
                tflops = [t for _, t in found[(shape, product, way)] if t]
                ms = median[way]
                rows.append([shape, product, way, f"{1000 * ms:.1f}", f"{statistics.median(tflops):.0f}" if tflops else "-",
                             fmt_x(ratio(median.get("cublas_experts"), ms)), fmt_ratio(ratio(ms, median.get("cublas_dense")))])
    print("The experts' products over a routed layer (bf16; first = gathered rows, bias + GELU; second = bias; "
          "_swiglu: silu(gate) * up in the tiles, no gate_up; _combine: with the layer's combine in the epilogue), median us; x experts = cublas_experts / this way (> 1: faster than the layer's path today); "
          "/ dense = this way / cublas_dense (the same FLOPs in one dense product):")
    print()
    print(table(["shape", "product", "way", "us", "TFLOP/s", "x experts", "/ dense"], rows))
    print()
    for line in failed:
        print(line)
    if failed:
        print()


def load_torch(path):
    if not path:
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"(no torch figures: {path}: {e})\n")
        return {}


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def fmt_ms(v):
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.2f}")


def fmt_x(v):
    return "-" if v is None else f"{v:.2f}x"


def fmt_ratio(v):
    return "-" if v is None else f"{v:.2f}"


def fmt_sci(v):
    return "-" if v is None else f"{v:.1e}"


def fmt_pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(argv) >= 2 else 2
    times, errors, context, note = load_ours(argv[1])
    peers = load_torch(argv[2] if len(argv) > 2 else None)
    torch_shapes = peers.get("shapes", {})
    if note:
        print(f"({note})\n")

    def ours(what, shape, prec):
        return times.get((what, shape, prec))

    def peer(shape, impl, field="forward_ms"):
        return torch_shapes.get(shape, {}).get(impl, {}).get(field)

    print(f"GPU: {context.get('gpu', '?')} (sm {context.get('gpu_sm', '?')}, CUDA runtime "
          f"{context.get('cuda_runtime', '?')}); torch {peers.get('torch', '-')} on {peers.get('device', '-')}")
    print()

    # ---- the PyTorch peers ----
    if torch_shapes:
        print("PyTorch peers, bf16, median ms (forward = under torch.no_grad(); fwd(grad) = autograd recording):")
        print()
        rows = []
        for shape in SHAPES:
            s = torch_shapes.get(shape)
            if not s:
                continue
            rows.append([shape,
                         fmt_ms(peer(shape, "loop")), fmt_ms(peer(shape, "loop", "forward_grad_ms")),
                         fmt_ms(peer(shape, "loop", "forward_backward_ms")),
                         fmt_ms(peer(shape, "grouped_mm")), fmt_ms(peer(shape, "grouped_mm", "forward_grad_ms")),
                         fmt_ms(peer(shape, "grouped_mm", "forward_backward_ms")),
                         fmt_ms(peer(shape, "hf_mixtral")), fmt_ms(peer(shape, "floor_mm")),
                         " / ".join(fmt_sci(peer(shape, "grouped_mm", f"check{kind}_rel_diff_vs_loop"))
                                    for kind in ("", "_padded"))])
        print(table(["shape", "loop fwd", "loop fwd(grad)", "loop fwd+bwd", "grouped_mm fwd", "grouped_mm fwd(grad)",
                     "grouped_mm fwd+bwd", "HF Mixtral block fwd", "torch.mm floor",
                     "grouped (/ padded) vs loop rel diff"],
                    rows))
        print()
        notes = []
        for shape in SHAPES:
            for impl, result in torch_shapes.get(shape, {}).items():
                if not isinstance(result, dict):
                    continue
                for field, value in result.items():
                    if field.endswith("_error"):
                        notes.append(f"- torch {shape} {impl} {field[:-len('_error')]}: {value}")
                if impl == "grouped_mm" and result.get("forward_backward_dispatch") and shape == SHAPES[0]:
                    notes.append(f"- grouped_mm fwd+bwd: {result['forward_backward_dispatch']}")
                if impl == "hf_mixtral" and result.get("note") and shape.startswith("gpt2"):
                    notes.append(f"- {shape} hf_mixtral: {result['note']}")
                if impl == "hf_mixtral" and result.get("experts_implementation"):
                    notes.append(f"- {shape} hf_mixtral experts implementation: {result['experts_implementation']}")
        if notes:
            print("\n".join(notes))
            print()

    # ---- ours, every figure ----
    print("bench_moe_cuda, median ms (fwd = SelfRoute, inference; fwd (train) = keeping what backward needs; "
          "floor = one expert's two cuBLAS GEMMs over T*k rows):")
    print()
    rows = []
    for shape in SHAPES:
        for prec in PRECISIONS:
            fwd = ours("moe_fwd", shape, prec)
            linear = ours("moe_fwd_linear", shape, prec)
            if fwd is None and linear is None and ours("floor_fwd", shape, prec) is None:
                continue
            torch_row = prec == TORCH_PRECISION
            rows.append([shape, prec, fmt_ms(fwd), fmt_ms(ours("moe_fwd_train", shape, prec)), fmt_ms(linear),
                         fmt_ms(ours("moe_fwdbwd", shape, prec)),
                         fmt_ms(ours("floor_fwd", shape, prec)), fmt_ms(ours("routing_dispatch", shape, prec)),
                         fmt_x(ratio(peer(shape, "grouped_mm"), linear)) if torch_row else "-",
                         fmt_x(ratio(peer(shape, "hf_mixtral"), fwd)) if torch_row else "-",
                         fmt_x(ratio(peer(shape, "loop"), fwd)) if torch_row else "-",
                         fmt_ratio(ratio(ours("floor_fwd", shape, prec), peer(shape, "floor_mm")))
                         if torch_row else "-"])
    print(table(["shape", "prec", "fwd", "fwd (train)", "fwd (Linear gate)", "fwd+bwd", "floor", "routing+dispatch",
                 "Linear fwd vs grouped_mm", "fwd vs HF block", "fwd vs loop", "cuBLAS floor / torch.mm floor"], rows))
    print()
    if errors:
        for (what, shape, prec), message in sorted(errors.items()):
            print(f"- bench_moe_cuda {what}/{shape}/{prec}: {message}")
        print()
    print_host_calls(load_host_calls(argv[1]))

    # ---- the experts' products on side streams against in order ----
    rows = []
    for shape in SHAPES:
        for prec in PRECISIONS:
            one, one_fb = ours("moe_fwd_lanes1", shape, prec), ours("moe_fwdbwd_lanes1", shape, prec)
            if one is None and one_fb is None:
                continue
            fwd, fwdbwd = ours("moe_fwd", shape, prec), ours("moe_fwdbwd", shape, prec)
            rows.append([shape, prec, fmt_ms(one), fmt_ms(fwd), fmt_x(ratio(one, fwd)), fmt_ms(one_fb), fmt_ms(fwdbwd),
                         fmt_x(ratio(one_fb, fwdbwd))])
    if rows:
        print("The experts' products spread over side streams (the device's default lanes) against in order on the "
              "stream (1 lane), median ms; gain = in order / spread:")
        print()
        print(table(["shape", "prec", "fwd, 1 lane", "fwd", "gain", "fwd+bwd, 1 lane", "fwd+bwd", "gain"], rows))
        print()

    # ---- the forward with the grouped GEMM ----
    products, product_failures = load_expert_products(argv[1])
    rows = []
    for shape in SHAPES:
        grouped = ours("moe_fwd_grouped", shape, "bf16")
        if grouped is None and not any(k == ("moe_fwd_grouped", shape, "bf16") for k in errors):
            continue
        fwd, floor = ours("moe_fwd", shape, "bf16"), ours("floor_fwd", shape, "bf16")
        share = ratio(ours("routing_grouped", shape, "bf16"), grouped)
        # SwiGLU's forward makes silu(gate) * up in its first product's tiles: that way's row where measured.
        first = (expert_product_ms(products, shape, "first", "grouped_128x4_swiglu")
                 or expert_product_ms(products, shape, "first", "grouped_128x4"))
        second = expert_product_ms(products, shape, "second", "grouped_128x4")
        second_combined = expert_product_ms(products, shape, "second", "grouped_128x4_combine")
        bare = first + second if first is not None and second is not None else None
        outside = grouped - bare if grouped is not None and bare is not None else None
        combine = second_combined - second if second_combined is not None and second is not None else None
        rows.append([shape, fmt_ms(fwd), fmt_ms(grouped), fmt_x(ratio(fwd, grouped)), fmt_ratio(ratio(fwd, floor)),
                     fmt_ratio(ratio(grouped, floor)), fmt_pct(share), fmt_ms(bare), fmt_pct(ratio(outside, grouped)),
                     "-" if combine is None else f"{1000 * combine:.1f}",
                     errors.get(("moe_fwd_grouped", shape, "bf16"), "")])
    if rows:
        print("The inference forward with the experts' products from the routing plan (ExpertGemm::grouped: one "
              "wgmma launch per product, rows gathered as they load, the combine in the second's epilogue, no host "
              "sync) against the default (per expert), bf16, median ms; gain = default / grouped; route share = "
              "routing_grouped / grouped; products = expert_product first (_swiglu for SwiGLU) + second grouped_128x4 "
              "(bare); outside share "
              "= (grouped - products) / grouped, everything but the products' own work; combine us = the second "
              "product with the combine less without:")
        print()
        print(table(["shape", "fwd", "fwd grouped", "gain", "fwd / floor", "grouped / floor", "route share", "products",
                     "outside share", "combine us", "error"], rows))
        print()

    # ---- training with the grouped GEMM ----
    rows = []
    for shape in SHAPES:
        train_g, fwdbwd_g = ours("moe_fwd_train_grouped", shape, "bf16"), ours("moe_fwdbwd_grouped", shape, "bf16")
        failures = [errors[k] for k in (("moe_fwd_train_grouped", shape, "bf16"), ("moe_fwdbwd_grouped", shape, "bf16"))
                    if k in errors]
        if train_g is None and fwdbwd_g is None and not failures:
            continue
        train, fwdbwd = ours("moe_fwd_train", shape, "bf16"), ours("moe_fwdbwd", shape, "bf16")
        floor = ours("floor_fwd", shape, "bf16")
        rows.append([shape, fmt_ms(train), fmt_ms(train_g), fmt_x(ratio(train, train_g)),
                     fmt_ratio(ratio(train_g, floor)), fmt_ms(fwdbwd), fmt_ms(fwdbwd_g), fmt_x(ratio(fwdbwd, fwdbwd_g)),
                     "; ".join(dict.fromkeys(failures))])  # one message once
    if rows:
        print("Training with the experts' forward products from the routing plan (ExpertGemm::grouped: no host wait "
              "in the forward; the backward gathers the sorted rows and runs its products per expert) against the "
              "default, bf16, median ms; gain = default / grouped:")
        print()
        print(table(["shape", "fwd train", "fwd train grouped", "gain", "grouped / floor", "fwd+bwd", "fwd+bwd grouped",
                     "gain", "error"], rows))
        print()

    # ---- one expert's products alone ----
    print_expert_gemms(times, errors)
    print_expert_products(products, product_failures)

    # ---- the targets, last ----
    passed = failed = missing = 0
    rows = []
    for shape in SHAPES:
        for prec in PRECISIONS:
            fwd, fwdbwd = ours("moe_fwd", shape, prec), ours("moe_fwdbwd", shape, prec)
            floor = ours("floor_fwd", shape, prec)
            torch_row = prec == TORCH_PRECISION
            if fwd is None and fwdbwd is None and floor is None and not torch_row:
                continue  # the bf16 rows always show, so a missing figure counts as MISSING
            values = {
                "ratio": ratio(fwd, floor),
                "vs_grouped": ratio(peer(shape, "grouped_mm"), fwd) if torch_row else None,
                "vs_loop": ratio(peer(shape, "loop", "forward_backward_ms"), fwdbwd) if torch_row else None,
                "share": ratio(ours("routing_dispatch", shape, prec), fwd),
            }
            formats = {"ratio": fmt_ratio, "vs_grouped": fmt_x, "vs_loop": fmt_x, "share": fmt_pct}
            cells = []
            for column in ("ratio", "vs_grouped", "vs_loop", "share"):
                value, text = values[column], formats[column](values[column])
                target = TARGETS.get((column, shape)) if torch_row else None
                if target:
                    test, goal = target
                    if value is None:
                        text, missing = f"MISSING ({goal})", missing + 1
                    elif test(value):
                        text, passed = f"{text} PASS ({goal})", passed + 1
                    else:
                        text, failed = f"{text} FAIL ({goal})", failed + 1
                cells.append(text)
            rows.append([shape, prec, fmt_ms(fwd), fmt_ms(floor), cells[0], cells[1], fmt_ms(fwdbwd), cells[2],
                         cells[3]])
    print(f"Targets (bf16 rows): {passed} PASS, {failed} FAIL, {missing} MISSING. Speedups = torch time / ours; "
          "vs grouped_mm: torch._grouped_mm forward (no_grad); vs loop: the eager torch loop's forward + backward.")
    print()
    print(table(["shape", "prec", "fwd ms", "floor ms", "fwd / floor", "vs torch grouped_mm (fwd)", "fwd+bwd ms",
                 "vs torch loop (fwd+bwd)", "routing+dispatch share of fwd"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
