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
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "torch_parity"))
import vit_torch  # noqa: E402

BATCH = 64
DATA_SEED = 42
MASK64 = (1 << 64) - 1


# The library's counter-based generator (moe/random.hpp), for the same images and labels as the C++ side.
def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def bits(seed, stream, counter):
    return mix64((mix64(mix64(seed ^ 0x9E3779B97F4A7C15) ^ stream) + counter * 0x9E3779B97F4A7C15) & MASK64)


def uniform(seed, stream, counter):
    return ((bits(seed, stream, counter) >> 11) + 0.5) * 2.0 ** -53


def normal(seed, stream, counter):  # Box-Muller, as moe::random::normal
    u1, u2 = uniform(seed, stream, 2 * counter), uniform(seed, stream, 2 * counter + 1)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def make_batch(config):
    pixels = config.channels * config.image_size ** 2
    images = torch.tensor([normal(DATA_SEED, 0, i) for i in range(BATCH * pixels)], dtype=torch.float32)
    labels = torch.tensor([bits(DATA_SEED, 1, b) % config.classes for b in range(BATCH)], dtype=torch.long)
    return images.view(BATCH, config.channels, config.image_size, config.image_size), labels


def bench_variant(variant, images, labels, warmup, steps):
    torch.manual_seed(1337)
    config = vit_torch.Config.small()
    model = vit_torch.ViT(config, variant)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
        lr=2e-3, betas=(0.9, 0.95), eps=1e-8)

    def step():
        _, loss = model(images, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(warmup):
        step()
    times, loss = [], 0.0
    slots = torch.zeros(len(model.moe_layers()), config.experts)  # router choices per block and expert
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        for l, layer in enumerate(model.moe_layers()):
            slots[l] += torch.bincount(layer.last_choices.reshape(-1), minlength=config.experts)
    seconds = statistics.median(times)
    result = {
        "variant": variant,
        "images_per_s": BATCH / seconds,
        "step_ms": seconds * 1e3,
        "step_runs_ms": [t * 1e3 for t in times],
        "loss": loss,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if model.moe_layers():  # as the C++ counter: the busiest expert's share in the worst block
        result["max_expert_fraction"] = float((slots.max(dim=1).values / slots.sum(dim=1)).max())
    return result


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
    json.dump({
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "batch": BATCH,
        "env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY")
                if os.environ.get(v)},
        "results": results,
    }, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
