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
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "torch_parity"))
import gpt2_torch  # noqa: E402
from torch_train_common import bits, environment, time_training  # noqa: E402

BATCH, SEQ = 16, 128
DATA_SEED = 42


def make_batch(vocab):  # the same token ids as the C++ side
    ids = [bits(DATA_SEED, 0, i) % vocab for i in range(BATCH * SEQ + 1)]
    tokens = torch.tensor(ids[:-1], dtype=torch.long).view(BATCH, SEQ)
    targets = torch.tensor(ids[1:], dtype=torch.long).view(BATCH, SEQ)
    return tokens, targets


def bench_variant(variant, warmup, steps):
    torch.manual_seed(1337)
    config = gpt2_torch.Config.small()
    model = gpt2_torch.GPT(config, variant)
    tokens, targets = make_batch(config.vocab)
    timed = time_training(model, lambda m: m(tokens, targets)[1], 6e-4, config.experts, warmup, steps)
    seconds = timed.pop("seconds")
    return {"variant": variant, "tokens_per_s": BATCH * SEQ / seconds, "step_ms": seconds * 1e3, **timed}


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
    json.dump({**environment(), "batch": BATCH, "seq": SEQ, "results": results}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
