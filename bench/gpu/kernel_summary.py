#!/usr/bin/env python3
"""Sums the kernel times of an Nsight Compute CSV (bench/gpu/profile.sh) by kernel, largest first.

    kernel_summary.py PROFILE.csv [--top 40]

The CSV is what `ncu --csv --print-units base --print-kernel-base demangled --metrics
gpu__time_duration.sum` prints. A kernel launched by the device's for_each / for_each_2d /
for_each_row is named by the function that holds its lambda, so "route_backward (lambda)" rather
than "for_each_kernel<...>"; a library kernel (cuBLAS, CUB) by its own name without template
arguments, a CUTLASS kernel by its template argument.
"""
import argparse
import csv
import io
import re
import sys
from collections import defaultdict


def strip_templates(text):
    depth, out = 0, []
    for ch in text:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def short_name(name):
    # The device's kernels run lambdas; ncu names them by the function that holds them:
    # for_each_kernel<Ns::Class<...>::function(args) const::[lambda(long) (instance 1)]>
    if "::[lambda" in name and "<" in name:
        holder = strip_templates(name[name.index("<") + 1:name.index("::[lambda")])
        holder = holder.split("(")[0].split()[-1]  # no parameters, no return type
        return holder.split("::")[-1] + " (lambda)"
    base = strip_templates(re.sub(r"\(.*$", "", name))  # no parameter list, no template arguments
    words = base.split()
    short = words[-1].split("::")[-1] if words else name[:60]
    if short in ("Kernel", "Kernel2", "device_kernel") and "<" in name:  # CUTLASS: the kernel is the argument
        inner = name[name.index("<") + 1:]
        return re.split(r"[<>(,]", inner)[0].split("::")[-1]
    return short


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    text = open(args.csv, encoding="utf-8", errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        sys.exit(f"kernel_summary: no ncu CSV header in {args.csv}")
    total = defaultdict(float)
    count = defaultdict(int)
    for row in csv.DictReader(io.StringIO(text[start:])):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        try:
            ns = float(row["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
        key = short_name(row.get("Kernel Name", "?"))
        total[key] += ns
        count[key] += 1
    whole = sum(total.values())
    print(f"{sum(count.values())} kernels, {whole / 1e6:.3f} ms of kernel time (serialized, no overlap)")
    print(f"| kernel | launches | total us | share |")
    print("|---|---:|---:|---:|")
    for key, ns in sorted(total.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {key} | {count[key]} | {ns / 1e3:.1f} | {100 * ns / whole:.1f}% |")


if __name__ == "__main__":
    main()
