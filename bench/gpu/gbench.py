"""Reading Google Benchmark's JSON output (--benchmark_out_format=json) for the GPU reports.

A run cut short (the device call's time limit, or Google Benchmark 1.7's abort when one
repetition of a benchmark fails and others pass) leaves the file without its end; read_runs then
keeps the context and every benchmark record written whole, and says so.
"""
import json


def read_runs(path):
    """(benchmark records, context, note): note is None for a whole file, else what was recovered."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
        return data.get("benchmarks", []), data.get("context", {}), None
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    context = {}
    at = text.find('"context"')
    if at >= 0:
        try:
            context, _ = decoder.raw_decode(text, text.find("{", at))
        except json.JSONDecodeError:
            context = {}
    records = []
    at = text.find('"benchmarks"')
    position = text.find("[", at) + 1 if at >= 0 else 0
    while position > 0:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break
        records.append(record)
    return records, context, f"{path} was cut short: {len(records)} whole benchmark records recovered"


def name_parts(record):
    """The benchmark's name as its parts, without Google Benchmark's own suffixes
    (manual_time, iterations:5, min_time:0.100, repeats:3, threads:1)."""
    name = record.get("run_name") or record.get("name", "")
    return tuple(p for p in name.split("/") if p and ":" not in p and p not in ("manual_time", "real_time"))


# The kinds of host call moe/cuda/host_times.hpp times, in its order (bench/gpu/host_counters.hpp
# writes host_<kind>_ms, host_<kind>_calls and host_<kind>_max_ms for each).
HOST_CALLS = ["launch", "gemm", "gemm_lt", "lt_heuristic", "sort", "upload", "wait"]
