#!/usr/bin/python3
"""PyTorch peer of bench_gpt2_train: training steps of the GPT-2 MoE model, fp32, 2 threads.

The model is tests/torch_parity/gpt2_torch.py (the one the whole-model parity test checks
against the C++ model): gpt2_torch.Config.small() (V=256, maxT=128, L=4, NH=4, H=128, F=512,
N=8, k=2), the MoE FFN in the common eager style (a loop over the experts with index_select and
index_add_). Batch B=16 x T=128 of the same token ids as the C++ benchmark. A step is

    loss = model(tokens, targets); loss.backward(); clip_grad_norm_(params, 1.0);
    optimizer.step(); optimizer.zero_grad(set_to_none=True)

with torch.optim.AdamW(lr 6e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on parameters of 2
or more dimensions only), as the C++ side. Each variant: warm-up steps, then the median of the
timed steps' tokens/s. Prints JSON.

Threads: torch.set_num_threads(2) (--threads). See bench/run_gpt2.sh for OMP_WAIT_POLICY.

Run with Debian's python3-torch: /usr/bin/python3 bench/torch_gpt2_train.py [--steps N] [--variant V]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "torch_parity"))
import gpt2_torch  # noqa: E402

BATCH, SEQ = 16, 128
DATA_SEED = 42
MASK64 = (1 << 64) - 1


# The library's counter-based generator (moe/random.hpp), for the same token ids as the C++ side.
def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def bits(seed, stream, counter):
    return mix64((mix64(mix64(seed ^ 0x9E3779B97F4A7C15) ^ stream) + counter * 0x9E3779B97F4A7C15) & MASK64)


def make_batch(vocab):
    ids = [bits(DATA_SEED, 0, i) % vocab for i in range(BATCH * SEQ + 1)]
    tokens = torch.tensor(ids[:-1], dtype=torch.long).view(BATCH, SEQ)
    targets = torch.tensor(ids[1:], dtype=torch.long).view(BATCH, SEQ)
    return tokens, targets


def bench_variant(variant, warmup, steps):
    torch.manual_seed(1337)
    config = gpt2_torch.Config.small()
    model = gpt2_torch.GPT(config, variant)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
        lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
    tokens, targets = make_batch(config.vocab)

    def step():
        _, loss = model(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(warmup):
        step()
    times, loss = [], 0.0
    slots = torch.zeros(len(model.moe_layers()), config.experts)  # router choices per layer and expert
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        for l, layer in enumerate(model.moe_layers()):
            slots[l] += torch.bincount(layer.last_choices.reshape(-1), minlength=config.experts)
    seconds = statistics.median(times)
    result = {
        "variant": variant,
        "tokens_per_s": BATCH * SEQ / seconds,
        "step_ms": seconds * 1e3,
        "step_runs_ms": [t * 1e3 for t in times],
        "loss": loss,
    }
    if model.moe_layers():  # as the C++ counter: the busiest expert's share in the worst layer
        result["max_expert_fraction"] = float((slots.max(dim=1).values / slots.sum(dim=1)).max())
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=("self", "linear", "dense"), action="append",
                        help="run only this variant (repeatable)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=9, help="timed steps per variant (median)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    results = []
    for variant in args.variant or ("self", "linear", "dense"):
        results.append(bench_variant(variant, args.warmup, args.steps))
        r = results[-1]
        print(f"torch {variant}: {r['tokens_per_s']:.0f} tokens/s ({r['step_ms']:.1f} ms/step)", file=sys.stderr)
    json.dump({
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "batch": BATCH, "seq": SEQ,
        "env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY")
                if os.environ.get(v)},
        "results": results,
    }, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
