"""What the PyTorch training peers (torch_gpt2_train.py, torch_vit_train.py) share: the library's
random generator, so both sides train on the same inputs, and the timed training loop with its
optimizer, so both peers time the same step.
"""
import math
import os
import platform
import statistics
import time

import torch

MASK64 = (1 << 64) - 1


# The library's counter-based generator (moe/random.hpp).
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


def time_training(model, loss_of, lr, experts, warmup, steps):
    """Times full training steps: loss_of(model) -> loss.backward() -> clip_grad_norm_(1.0) ->
    AdamW(lr, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on 2-D and larger parameters only) ->
    zero_grad(set_to_none). Returns the median step's seconds, every step's seconds, the last loss
    and, for MoE models, the busiest expert's share of the router choices in the worst layer (as
    the C++ benchmarks' max_expert_fraction counter)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8)

    def step():
        loss = loss_of(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(warmup):
        step()
    times, loss = [], 0.0
    slots = torch.zeros(len(model.moe_layers()), experts)  # router choices per layer and expert
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        for l, layer in enumerate(model.moe_layers()):
            slots[l] += torch.bincount(layer.last_choices.reshape(-1), minlength=experts)
    result = {"seconds": statistics.median(times), "step_runs_ms": [t * 1e3 for t in times], "loss": loss}
    if model.moe_layers():
        result["max_expert_fraction"] = float((slots.max(dim=1).values / slots.sum(dim=1)).max())
    return result


def environment():
    """The JSON header of a peer's output: versions, threads and the relevant environment."""
    return {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY")
                if os.environ.get(v)},
    }
