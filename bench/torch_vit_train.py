#!/usr/bin/python3
"""PyTorch peer of bench_vit_train: training steps of the ViT MoE model, fp32, 2 threads.

The model is tests/torch_parity/vit_torch.py (checked against the C++ model on the same weights
by running that file as a script): vit_torch.Config.small() (28x28x1 images, patch 7 -> 16
patches + the class token, L=6, NH=4, H=128, F=256, MoE with N=4, k=2 in blocks 1, 3, 5), the
MoE FFN in the common eager style (a loop over the experts with index_select and index_add_).
Batch B=64 of the same images and labels as the C++ benchmark. A step is

    loss = model(images, labels); loss.backward(); clip_grad_norm_(params, 1.0);
    optimizer.step(); optimizer.zero_grad(set_to_none=True)

with torch.optim.AdamW(lr 2e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on parameters of 2
or more dimensions only), as the C++ side. Each variant: warm-up steps, then the median of the
timed steps' images/s. Prints JSON.

Threads: torch.set_num_threads(2) (--threads). See bench/run_vit.sh for OMP_WAIT_POLICY.

Run with Debian's python3-torch: /usr/bin/python3 bench/torch_vit_train.py [--steps N] [--variant V]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "torch_parity"))
import vit_torch  # noqa: E402
from torch_train_common import bits, environment, normal, time_training  # noqa: E402

BATCH = 64
DATA_SEED = 42


def make_batch(config):  # the same images and labels as the C++ side
    pixels = config.channels * config.image_size ** 2
    images = torch.tensor([normal(DATA_SEED, 0, i) for i in range(BATCH * pixels)], dtype=torch.float32)
    labels = torch.tensor([bits(DATA_SEED, 1, b) % config.classes for b in range(BATCH)], dtype=torch.long)
    return images.view(BATCH, config.channels, config.image_size, config.image_size), labels


def bench_variant(variant, images, labels, warmup, steps):
    torch.manual_seed(1337)
    config = vit_torch.Config.small()
    model = vit_torch.ViT(config, variant)
    timed = time_training(model, lambda m: m(images, labels)[1], 2e-3, config.experts, warmup, steps)
    seconds = timed.pop("seconds")
    return {"variant": variant, "images_per_s": BATCH / seconds, "step_ms": seconds * 1e3, **timed,
            "parameters": sum(p.numel() for p in model.parameters())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=("self", "linear", "dense"), action="append",
                        help="run only this variant (repeatable)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (median)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    images, labels = make_batch(vit_torch.Config.small())
    results = []
    for variant in args.variant or ("self", "linear", "dense"):
        results.append(bench_variant(variant, images, labels, args.warmup, args.steps))
        r = results[-1]
        print(f"torch {variant}: {r['images_per_s']:.0f} images/s ({r['step_ms']:.1f} ms/step)", file=sys.stderr)
    json.dump({**environment(), "batch": BATCH, "results": results}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
