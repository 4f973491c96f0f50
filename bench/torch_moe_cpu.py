#!/usr/bin/python3
"""PyTorch peer of bench_moe_cpu: the common eager MoE layer on the CPU, fp32, 2 threads.

The pattern most PyTorch MoE code uses (the shape of Hugging Face's Mixtral block): a learned
linear router, topk, softmax over the selected logits, then a Python loop over the experts that
index_select()s each expert's tokens, runs the expert MLP (nn.Linear -> tanh-GELU -> nn.Linear)
and index_add_()s the weighted output back into the tokens.

Threads: torch.set_num_threads(2) (--threads). Debian's torch runs its GEMMs on OpenBLAS's own
pthread pool; with the default OMP_WAIT_POLICY its OpenMP threads spin between parallel regions
and compete with it, so bench/run_cpu.sh runs this script twice: as is, and with
OMP_WAIT_POLICY=PASSIVE (see bench/RESULTS.md).

Timed per shape: forward with autograd on (what a training step runs), forward under
torch.no_grad() (inference), and forward + backward (x.requires_grad, so d(x) is produced as
the C++ layer does). Each is the median of several iterations after warm-up. Prints JSON.

Run with Debian's python3-torch: /usr/bin/python3 bench/torch_moe_cpu.py [--quick]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

SHAPES = [
    # name, H, F, N, k, T, iterations (forward, forward+backward)
    ("gpt2", 768, 3072, 8, 2, 2048, 5, 4),
    ("small", 128, 512, 8, 2, 8192, 15, 7),
]


class Expert(nn.Module):
    def __init__(self, hidden, ffn):
        super().__init__()
        self.fc = nn.Linear(hidden, ffn)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(ffn, hidden)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class MoE(nn.Module):
    def __init__(self, hidden, ffn, experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, ffn) for _ in range(experts))

    def forward(self, x):  # x: [T, H]
        logits = self.router(x)                                   # [T, N]
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)  # [T, k]
        weights = top_logits.softmax(dim=-1)                       # softmax over the selected
        y = torch.zeros_like(x)
        # one_hot(...)[e] marks, for expert e, which (choice, token) pairs picked it
        expert_mask = nn.functional.one_hot(top_experts, len(self.experts)).permute(2, 1, 0)  # [N, k, T]
        for e, expert in enumerate(self.experts):
            choice, token = torch.where(expert_mask[e])
            if token.numel() == 0:
                continue
            out = expert(x.index_select(0, token)) * weights[token, choice, None]
            y.index_add_(0, token, out)
        return y


def timed(fn, warmup, iterations):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_shape(name, H, F, N, k, T, fwd_iters, fb_iters):
    torch.manual_seed(0)
    layer = MoE(H, F, N, k)
    # GPT-2-like init for the experts; N(0, 1/H) router (unit-variance logits on unit-variance x)
    with torch.no_grad():
        for expert in layer.experts:
            nn.init.normal_(expert.fc.weight, std=0.02)
            nn.init.normal_(expert.proj.weight, std=0.02)
            nn.init.zeros_(expert.fc.bias)
            nn.init.zeros_(expert.proj.bias)
        nn.init.normal_(layer.router.weight, std=H ** -0.5)
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(T, H, generator=gen)
    dy = torch.randn(T, H, generator=gen) / T
    x_grad = x.clone().requires_grad_(True)

    def forward():
        layer(x_grad)

    def forward_no_grad():
        with torch.no_grad():
            layer(x)

    def forward_backward():
        layer(x_grad).backward(dy)

    fwd, fwd_all = timed(forward, 1, fwd_iters)
    fwd_ng, fwd_ng_all = timed(forward_no_grad, 1, fwd_iters)
    fb, fb_all = timed(forward_backward, 1, fb_iters)
    flops = 4.0 * T * k * H * F
    return {
        "shape": name, "H": H, "F": F, "N": N, "k": k, "T": T,
        "forward_ms": fwd * 1e3,
        "forward_no_grad_ms": fwd_ng * 1e3,
        "forward_backward_ms": fb * 1e3,
        "forward_gflops": flops / fwd / 1e9,
        "forward_backward_gflops": 3 * flops / fb / 1e9,
        "forward_runs_ms": [t * 1e3 for t in fwd_all],
        "forward_no_grad_runs_ms": [t * 1e3 for t in fwd_ng_all],
        "forward_backward_runs_ms": [t * 1e3 for t in fb_all],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", choices=[s[0] for s in SHAPES], action="append",
                        help="run only this shape (repeatable)")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    results = []
    for name, H, F, N, k, T, fwd_iters, fb_iters in SHAPES:
        if args.shape and name not in args.shape:
            continue
        if args.quick:
            fwd_iters, fb_iters = 2, 1
        results.append(bench_shape(name, H, F, N, k, T, fwd_iters, fb_iters))
        print(f"torch {name}: forward {results[-1]['forward_ms']:.1f} ms, "
              f"forward+backward {results[-1]['forward_backward_ms']:.1f} ms", file=sys.stderr)
    json.dump({
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "blas": "see torch.__config__.show(); Debian python3-torch links OpenBLAS",
        "env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY") if os.environ.get(v)},
        "results": results,
    }, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
