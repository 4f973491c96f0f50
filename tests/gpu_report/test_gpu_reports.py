#!/usr/bin/env python3
"""bench/gpu/report.py, report_gpt2.py and kernel_summary.py on outputs shaped as the GPU run writes them (no GPU
needed): Google Benchmark 1.7's JSON (names with /min_time:0.100/ and /manual_time, repetitions
and their aggregates, rows that failed, a file cut short) and the torch scripts' JSON. Each check
names the figure a GPU session would otherwise read wrong. Exits 1 on the first failed check.

  python3 tests/gpu_report/test_gpu_reports.py
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT = os.path.join(ROOT, "bench", "gpu", "report.py")
REPORT_GPT2 = os.path.join(ROOT, "bench", "gpu", "report_gpt2.py")
KERNEL_SUMMARY = os.path.join(ROOT, "bench", "gpu", "kernel_summary.py")

# Nsight Compute 2025.3's CSV as bench/gpu/profile.sh asks for it (names as ncu demangles them on an
# H200, 2026-12-04): after the program's own output, one row per kernel, times in ns with commas.
NCU_CSV = """Benchmark output the program printed first
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","582","b","h","void moe::for_each_2d_kernel<moe::BasicBackend<moe::bfloat16, moe::CudaDevice>::fill(moe::MatrixView<moe::bfloat16>, moe::bfloat16) const::[lambda(long, long) (instance 1)]>(long, long, T1)","1","7","(256, 1, 1)","(1024, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","21,472"
"1","582","b","h","void moe::for_each_kernel<void nn::attention_forward<moe::bfloat16, moe::CudaDevice>(const T2 &, moe::MatrixView<const T1>, long, long, long, bool, moe::MatrixView<T1>, T1 *, long)::[lambda(long) (instance 1)]>(long, T1)","1","7","(256, 1, 1)","(6, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","2,336"
"2","582","b","h","void moe::for_each_2d_kernel<moe::BasicBackend<moe::bfloat16, moe::CudaDevice>::fill(moe::MatrixView<moe::bfloat16>, moe::bfloat16) const::[lambda(long, long) (instance 1)]>(long, long, T1)","1","7","(256, 1, 1)","(1024, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","8,528"
"3","582","b","h","void cutlass::Kernel2<cutlass_75_tensorop_bf16_s1688gemm_bf16_128x128_tn_align1>(T1::Params)","1","7","(128, 1, 1)","(512, 50, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","6,682,240"
"""

SHAPES = {"gpt2_T16384": 1.0, "gpt2_T1024": 0.15, "mixtral_T4096": 6.0}  # a time scale per shape
# Our bf16 medians (ms) at scale 1; repetitions take x 1.0, 1.02, 1.3, so the median is 1.02 x.
OURS = {"moe_fwd": 0.80, "moe_fwd_train": 0.85, "moe_fwd_linear": 0.82, "moe_fwdbwd": 2.30, "routing_dispatch": 0.035, "floor_fwd": 0.60}


def gbench_records(name, times, counters=None, error=None):
    """The rows Google Benchmark 1.7 writes for one benchmark run len(times) times (ms)."""
    rows = []
    for i, t in enumerate(times):
        row = {"name": name, "run_name": name, "run_type": "iteration", "repetitions": len(times),
               "repetition_index": i, "threads": 1, "iterations": 0 if error else 100,
               "real_time": 0 if error else t, "cpu_time": 1e-5, "time_unit": "ms"}
        if error:
            row.update({"error_occurred": True, "error_message": error})
        row.update(counters or {})
        rows.append(row)
    if len(times) > 1 and not error:
        for aggregate in ("mean", "median", "stddev", "cv"):
            value = {"mean": sum(times) / len(times), "median": sorted(times)[len(times) // 2],
                     "stddev": 0.1, "cv": 0.05}[aggregate]
            rows.append({"name": f"{name}_{aggregate}", "run_name": name, "run_type": "aggregate",
                         "repetitions": len(times), "threads": 1, "aggregate_name": aggregate,
                         "aggregate_unit": "time" if aggregate != "cv" else "percentage", "iterations": len(times),
                         "real_time": value, "cpu_time": 1e-5, "time_unit": "ms", **(counters or {})})
    return rows


def moe_json(errors=()):
    benchmarks = []
    for shape, scale in SHAPES.items():
        for precision, slower in (("bf16", 1.0), ("fp32", 5.0)):
            if shape == "mixtral_T4096" and precision != "bf16":
                continue
            lanes1 = {"moe_fwd_lanes1": 0.96, "moe_fwdbwd_lanes1": 2.53, "moe_fwd_grouped": 0.64, "routing_grouped": 0.032,
                      "moe_fwd_train_grouped": 0.70, "moe_fwdbwd_grouped": 2.10} if precision == "bf16" else {}
            for what, ms in {**OURS, **lanes1}.items():
                name = f"{what}/{shape}/{precision}" + ("/min_time:0.100" if what == "floor_fwd" else "") + "/manual_time"
                base = ms * scale * slower
                error = "CUDA error: out of memory" if (what, shape, precision) in errors else None
                counters = None
                if what == "moe_fwd" and shape == "gpt2_T16384" and precision == "bf16":  # host_counters.hpp's
                    counters = {"host_calls_ms": 0.25, "host_launch_ms": 0.05, "host_launch_calls": 9,
                                "host_gemm_ms": 0.0, "host_gemm_calls": 0, "host_gemm_lt_ms": 0.08,
                                "host_gemm_lt_calls": 16, "host_lt_heuristic_ms": 0.0, "host_lt_heuristic_calls": 0,
                                "host_sort_ms": 0.01, "host_sort_calls": 1, "host_upload_ms": 0.0,
                                "host_upload_calls": 0, "host_wait_ms": 0.11, "host_wait_calls": 1}
                benchmarks += gbench_records(name, [base, 1.02 * base, 1.3 * base], counters, error=error)
    # One expert's products alone (us as Google Benchmark writes them with Unit(kMicrosecond)).
    for product, us in (("gelu_fwd", 40.0), ("dgelu_nn", 60.0), ("dgelu_tn", 30.0)):
        for rows, scale in ((2048, 1.0), (4096, 2.0)):
            name = f"expert_gemm/{product}_R{rows}/bf16/min_time:0.100/manual_time"
            records = gbench_records(name, [us * scale] * 3)
            for record in records:
                record["time_unit"] = "us"
            benchmarks += records
    # The experts' products by way (expert_product/<first|second>/<way>/<shape>/bf16), one failing.
    for product, way, us in (("first", "grouped_128x4", 50.0), ("first", "cublas_experts", 75.0),
                             ("first", "cublas_dense", 40.0), ("first", "grouped_256x4", 0),
                             ("second", "grouped_128x4", 400.0), ("second", "grouped_128x4_combine", 420.0)):
        name = f"expert_product/{product}/{way}/gpt2_T16384/bf16/min_time:0.020/manual_time"
        error = "grouped_gemm: needs an sm_90 GPU" if not us else None
        records = gbench_records(name, [us, us, 2 * us], {"TFLOP/s": 600.0}, error=error)
        for record in records:
            record["time_unit"] = "us"
        benchmarks += records
    return {"context": {"host_name": "gpu-machine", "gpu": "NVIDIA H200", "gpu_sm": "9.0", "cuda_runtime": "13000"},
            "benchmarks": benchmarks}


def torch_moe_json():
    shapes = {}
    for shape, scale in SHAPES.items():
        shapes[shape] = {
            "grouped_mm": {"forward_ms": 1.30 * scale, "forward_grad_ms": 1.4 * scale, "forward_backward_ms": 4.2 * scale},
            "loop": {"forward_ms": 2.4 * scale, "forward_grad_ms": 2.6 * scale, "forward_backward_ms": 8.1 * scale},
            "hf_mixtral": {"forward_ms": 3.3 * scale},
            "floor_mm": {"forward_ms": 0.62 * scale},
        }
    return {"torch": "2.11.0", "device": "NVIDIA H200", "shapes": shapes}


def gpt2_json(repetitions=1, self_error=None, batch=8, accumulation=None):
    benchmarks = gbench_records("Peak/bf16_gemm/iterations:10/manual_time", [7.0] * repetitions, {"tflops": 780.0})
    for variant, ms in (("self", 70.0), ("linear", 72.0), ("dense", 55.0)):
        counters = {"tokens/s": 8192 * 1000 / ms, "step_ms": ms, "mfu": 0.18, "device_gib": 21.5, "batch": batch}
        if variant == "self":  # bench_gpt2_cuda's ledger peak (older JSON has none: the linear and dense rows)
            counters["peak_gib"] = 19.75
        if accumulation is not None:  # bench_gpt2_cuda's ACCUMULATION (older JSON has no such counter)
            counters["accumulation"] = accumulation
        if variant == "self":  # bench_gpt2_cuda's time_phases (the dense row goes without them)
            phases = {"zero_grad": (0.2, 0.3), "forward": (20.5, 24.0), "backward": (30.0, 33.25), "clip": (3.0, 3.5),
                      "adamw": (0.4, 8.0)}
            for name, (host, gpu) in phases.items():
                counters[f"{name}_host_ms"], counters[f"{name}_gpu_ms"] = host, gpu
            host_calls = {"launch": (1200, 6.5, 0.9), "gemm": (300, 2.0, 0.05), "gemm_lt": (250, 4.0, 1.5),
                          "lt_heuristic": (3, 1.2, 0.6), "sort": (12, 0.3, 0.03), "upload": (3, 0.1, 0.05),
                          "wait": (14, 30.0, 9.0)}
            for name, (calls, ms, longest) in host_calls.items():
                counters[f"host_{name}_calls"], counters[f"host_{name}_ms"] = calls, ms
                counters[f"host_{name}_max_ms"] = longest
            counters["host_calls_ms"] = 42.9
        error = self_error if variant == "self" else None
        benchmarks += gbench_records(f"Train/{variant}/bf16/iterations:5/manual_time", [ms] * repetitions, counters,
                                     error)
    benchmarks += gbench_records("Train/self_grouped/bf16/iterations:8/manual_time", [60.0] * repetitions,
                                 {"tokens/s": 8192 * 1000 / 60.0, "step_ms": 60.0, "batch": batch})
    benchmarks += gbench_records("Train/self_dgelu_transposed/bf16/iterations:8/manual_time", [64.0] * repetitions,
                                 {"tokens/s": 8192 * 1000 / 64.0, "step_ms": 64.0, "batch": batch})
    for kernel, ms in (("fused", 0.5), ("materialized", 1.5)):
        for pass_, scale in (("fwd", 1.0), ("fwdbwd", 3.0)):
            benchmarks += gbench_records(f"Attention/{kernel}/bf16/{pass_}/iterations:5/manual_time",
                                         [ms * scale] * repetitions,
                                         {"tflops": 100.0 / ms, "cache_mib": 3.0 if kernel == "fused" else 1536.0})
    return {"context": {"host_name": "gpu-machine", "gpu": "NVIDIA H200", "attention": "fused"}, "benchmarks": benchmarks}


def torch_gpt2_json(batch=8, accumulation=None):
    entries = [{"variant": v, "mode": m, "tokens_per_s": t, "peak_memory_gib": g}
               for v, m, t, g in (("self", "eager", 60000.0, 24.04), ("self", "compile", 95000.0, 20.0))]
    entries.append({"variant": "linear", "mode": "compile",
                    "error": "BackendCompilerFailed: backend='inductor' raised:\nRuntimeError: the real cause"})
    shape = {"sequences": batch, "seq": 1024, "tokens_per_step": batch * (accumulation or 1) * 1024}
    if accumulation is not None:
        shape["accumulation"] = accumulation
    return {"peak": {"tflops": 760.0}, "batch": shape, "entries": entries}


def run(script, *paths):
    result = subprocess.run([sys.executable, script, *paths], capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"{os.path.basename(script)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def fail(message):
    print("FAILED:", message)
    sys.exit(1)


def expect(output, text, why):
    if text not in output:
        fail(f"{why}: '{text}' not in the output:\n{output}")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        def write(name, data, cut=None):
            path = os.path.join(tmp, name)
            text = json.dumps(data, indent=2)
            with open(path, "w") as f:
                f.write(text[:cut] if cut else text)
            return path

        def write_text(name, text):
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                f.write(text)
            return path

        torch_moe = write("torch_cuda.json", torch_moe_json())
        out = run(REPORT, write("moe_cuda.json", moe_json()), torch_moe)
        # The floor's name carries /min_time:0.100/: its median (1.02 x 0.60) must reach the targets.
        expect(out, "| gpt2_T16384 | bf16 | 0.816 | 0.612 | 1.33 FAIL (<= 1.15)", "forward / floor from the medians")
        expect(out, "1.59x PASS (>= 1.5x)", "torch grouped_mm forward / ours (1.30 / 0.816)")
        expect(out, "3.45x PASS (>= 3x)", "torch loop forward+backward / ours (8.1 / 2.346)")
        expect(out, "4.4% PASS (< 5%)", "routing + dispatch share of the forward (0.0357 / 0.816)")
        expect(out, "| mixtral_T4096 | bf16 | 4.896 | 3.672 | 1.33 FAIL", "the Mixtral shape's row")
        expect(out, "Targets (bf16 rows): 3 PASS, 3 FAIL, 0 MISSING", "every target has its figures")
        expect(out, "| gpt2_T16384 | bf16 | 0.816 | 0.867 | 0.836 | 2.346 | 0.612 | 0.036 |",
               "inference forward, training forward, Linear gate, fwd+bwd, floor, routing in their columns")

        # The experts' products in order (1 lane) against spread: 0.96 x 1.02 / 0.816 = 1.20x.
        expect(out, "| gpt2_T16384 | bf16 | 0.979 | 0.816 | 1.20x | 2.581 | 2.346 | 1.10x |",
               "the lanes table: in order, spread and the gain, forward then forward + backward")
        if "| gpt2_T16384 | fp32 | " in out.split("against in order")[1].split("Targets")[0]:
            fail(f"the lanes table lists a precision without its 1-lane rows:\n{out}")
        expect(out, "| moe_fwd/gpt2_T16384/bf16 | 0.250 | 0.050 (9) | 0.000 (0) | 0.080 (16) | 0.000 (0) | "
               "0.010 (1) | 0.000 (0) | 0.110 (1) |", "the layer's host calls per call, in HOST_CALLS order")
        # dgelu_nn at R = 2048: 2 x 2048 x 768 x 3072 FLOP in 60 us = 161 TFLOP/s; R = 4096 in 120 us, the same.
        expect(out, "| dgelu_nn | 60.0 | 161 | 120.0 | 161 |", "one expert's products: us and TFLOP/s per row count")
        expect(out, "| dgelu_tn | 30.0 | 322 | 60.0 | 322 |", "the transposed layout's row")
        if out.index("| gelu_fwd |") > out.index("| dgelu_nn |"):
            fail(f"the expert products are not in their listed order:\n{out}")
        # The grouped forward: 0.816 / 0.653 = 1.25x the default; 0.653 / 0.612 = 1.07 of the floor.
        # Its products bare: 50 + 400 us; outside them (0.653 - 0.450) / 0.653 = 31.1%; the combine 420 - 400 us.
        expect(out, "| gpt2_T16384 | 0.816 | 0.653 | 1.25x | 1.33 | 1.07 | 5.0% | 0.450 | 31.1% | 20.0 |",
               "the grouped forward against the default and the floor, its route share (0.0326 / 0.653), and "
               "everything but its products")
        # Training grouped: forward 0.867 / 0.714 = 1.21x, 0.714 / 0.612 = 1.17 of the floor; forward + backward
        # 2.346 / 2.142 = 1.10x.
        expect(out, "| gpt2_T16384 | 0.867 | 0.714 | 1.21x | 1.17 | 2.346 | 2.142 | 1.10x |",
               "the grouped training forward and forward + backward against the default")
        # The experts' products: 75 / 50 = 1.50x the layer's path, 50 / 40 = 1.25 of the dense product.
        expect(out, "| gpt2_T16384 | first | grouped_128x4 | 50.0 | 600 | 1.50x | 1.25", "a grouped way against both cuBLAS ways")
        expect(out, "| gpt2_T16384 | first | cublas_dense | 40.0 | 600 | 1.88x | 1.00", "the dense way's own row")
        expect(out, "expert_product/first/grouped_256x4/gpt2_T16384/bf16: grouped_gemm: needs an sm_90 GPU",
               "a way that failed, with its message")
        if out.count("| moe_fwd/") != 1:
            fail(f"rows without host counters were listed in the host-call table:\n{out}")
        # A benchmark that failed: its target MISSING and its message listed.
        out = run(REPORT, write("moe_error.json", moe_json(errors={("moe_fwd", "gpt2_T1024", "bf16")})), torch_moe)
        expect(out, "moe_fwd/gpt2_T1024/bf16: CUDA error: out of memory", "the failed benchmark's message")
        expect(out, "MISSING (>= 2x)", "the target without its figure")

        # A file cut short (a call stopped at its limit): the whole records before the cut count.
        whole = json.dumps(moe_json(), indent=2)
        out = run(REPORT, write("moe_cut.json", moe_json(), cut=int(len(whole) * 0.6)), torch_moe)
        expect(out, "was cut short", "the note that the file was cut short")
        expect(out, "| gpt2_T16384 | bf16 | 0.816 | 0.612 |", "the figures written before the cut")

        # GPT-2: tokens/s, MFU, the torch ratios; repetitions read through their median only.
        torch_gpt2 = write("torch_gpt2_cuda.json", torch_gpt2_json())
        for repetitions in (1, 3):
            out = run(REPORT_GPT2, write(f"gpt2_{repetitions}.json", gpt2_json(repetitions)), torch_gpt2)
            expect(out, "| self | bf16 | 117,029 | 70.0 | 18.0% | 21.5 | 19.8 / 24.0 | 60,000 | 95,000 | 1.95x | 1.23x |",
                   f"the self row with {repetitions} repetition(s)")
            expect(out, "| linear | bf16 | 113,778 | 72.0 | 18.0% | 21.5 | - / - | - |",
                   "a row without a ledger peak (older JSON) and without a torch entry")
            expect(out, "bf16 GEMM peak: ours 780 TFLOP/s", "the peak, not an aggregate's statistic")
            expect(out, "DgeluWeights::transposed (the backward through the GELU over W2's transposes): 128,000 tokens/s, "
                   "step 64.0 ms (1.094x self's 117,029)", "the transposed DGELU row against self's")
            expect(out, "ExpertGemm::grouped (the experts' forward products from the routing plan, no host wait in "
                   "the forward): 136,533 tokens/s, step 60.0 ms (1.167x self's 117,029)", "the grouped row against self's")
            main_table = out.split("| variant | precision | ours tokens/s")[1].split("\n\n")[0]
            if "| self_dgelu_transposed |" in main_table or "| self_grouped |" in main_table:
                fail(f"a device setting's row is in the main table:\n{out}")
            expect(out, "NVIDIA H200", "the GPU's name from the context")
            expect(out, "our training steps' attention: fused", "which attention the training rows ran")
            expect(out, "RuntimeError: the real cause", "the second line of a torch.compile error")
            expect(out, "| self | bf16 | 0.2 / 0.3 | 20.5 / 24.0 | 30.0 / 33.2 | 3.0 / 3.5 | 0.4 / 8.0 |",
                   "the phases' host and device times, in PHASES order")
            expect(out, "| self | bf16 | 54.1 | 42.9 | 6.5 (1,200) [0.90] | 2.0 (300) [0.05] | 4.0 (250) [1.50] | "
                   "1.2 (3) [0.60] | 0.3 (12) [0.03] | 0.1 (3) [0.05] | 30.0 (14) [9.00] |",
                   "the host calls by kind, in HOST_CALLS order, after the step's host ms and their sum")
            expect(out, "| fwdbwd | 1.500 [200] | 4.500 [67] | 3.00x | 3 | 1536 |",
                   "the attention kernels side by side, with the fused one's gain")
            if out.count("| linear | bf16 | ") > 1 or out.count("| dense | bf16 | ") > 1:
                fail(f"a row without host call times was listed in the host calls table:\n{out}")
            if "| linear | bf16 | -" in out or "| dense | bf16 | - /" in out:
                fail(f"a row without phase timings was listed in the phases table:\n{out}")
            expect(out, "Batch (sequences x micro-batches a step): ours 8 x 1024 tokens, torch 8 x 1024 tokens\n",
                   "both batches, the same")
        out = run(REPORT_GPT2, write("gpt2_batch32.json", gpt2_json(batch=32)), torch_gpt2)
        expect(out, "Batch (sequences x micro-batches a step): ours 32 x 1024 tokens, torch 8 x 1024 tokens (NOT the same",
               "a warning when the two ran different batches")
        # Gradient accumulation: the micro-batches printed, and a step of 16 x 4 unlike one of 16 (or 64).
        out = run(REPORT_GPT2, write("gpt2_b16x4.json", gpt2_json(batch=16, accumulation=4)),
                  write("torch_gpt2_b16x4.json", torch_gpt2_json(batch=16, accumulation=4)))
        expect(out, "ours 16 x 4 x 1024 tokens, torch 16 x 4 x 1024 tokens\n", "both steps, 4 micro-batches of 16")
        out = run(REPORT_GPT2, write("gpt2_b16x4b.json", gpt2_json(batch=16, accumulation=4)),
                  write("torch_gpt2_b16.json", torch_gpt2_json(batch=16, accumulation=1)))
        expect(out, "ours 16 x 4 x 1024 tokens, torch 16 x 1024 tokens (NOT the same",
               "a warning when only one side accumulated")
        out = run(REPORT_GPT2, write("gpt2_error.json", gpt2_json(self_error="out of memory")), torch_gpt2)
        expect(out, "| self | bf16 | error: out of memory", "the failed row")
        expect(out, ">= 1.3x PyTorch eager: -  NOT met", "the targets still listed when their row failed")

        # Nsight Compute's kernels summed by name: a lambda's kernel by the function that holds it.
        out = run(KERNEL_SUMMARY, write_text("profile.csv", NCU_CSV))
        expect(out, "4 kernels, 6.715 ms of kernel time", "the kernel count and the total (ns with commas)")
        expect(out, "| cutlass_75_tensorop_bf16_s1688gemm_bf16_128x128_tn_align1 | 1 | 6682.2 | 99.5% |",
               "a CUTLASS kernel by its template argument, largest first")
        expect(out, "| fill (lambda) | 2 | 30.0 | 0.4% |", "two launches of fill's lambda summed")
        expect(out, "| attention_forward (lambda) | 1 | 2.3 |", "a free function's lambda")
    print("gpu reports: every check passed")


if __name__ == "__main__":
    main()
