#!/usr/bin/env python3
"""PyTorch peer of the GPU training benchmark: whole training steps of GPT-2 small with MoE FFNs
on one GPU, bf16 autocast over fp32 master weights. Prints (or writes) JSON.

The model (self-contained here, in the GPU-efficient form; the names and layouts are those of
tests/torch_parity/gpt2_torch.py and of the library's checkpoints):
  GPT-2 small: V = 50257, context 1024, L = 12 layers, 12 heads, H = 768, F = 3072; pre-LayerNorm
  blocks (eps 1e-5), learned positions, causal attention through
  F.scaled_dot_product_attention(is_causal=True), tied embeddings (logits = ln_f(x) wte^T),
  tanh-GELU, mean cross-entropy; biases on c_attn, c_proj and every expert's fc and proj;
  nn.Linear layouts ([out, in]); GPT-2's initialisation (gpt2_torch.init_gpt2_).
  --variant (repeatable, default all three):
    self    MoE FFN, Self-Routing: the router logits are the LAST N = 8 coordinates of the MoE
            layer's input (ln_2's output), no router parameters
    linear  MoE FFN, a learned router nn.Linear(H, N, bias=False) (h.{l}.moe.router.weight)
    dense   GPT-2's MLP (h.{l}.mlp.c_fc, h.{l}.mlp.c_proj)
  MoE: N = 8 experts, top-2, routing weights = softmax over the 2 selected logits, no load-balancing
  loss, dropless. The experts are stacked as the library stores them: h.{l}.moe.experts.fc.weight
  [N, F, H], .fc.bias [N, F], .proj.weight [N, H, F], .proj.bias [N, H].

The experts run with torch._grouped_mm and argsort dispatch (as bench/gpu/torch_moe_cuda.py's
grouped_mm path, padded form): the (token, choice) slots stably sorted by expert, each expert's
group padded with zero rows to a multiple of 8 rows (grouped_mm's backward needs 16-byte-aligned
groups), int32 offsets = the cumulative padded group ends, one grouped GEMM per projection over all
experts, the expert's bias added to each row by a gather (F.embedding(expert of row, bias): its
backward is a segment sum, not index_add_'s atomics piled on N rows), GELU tanh, then the rows
gathered back into slot order and summed per token with the routing weights. torch._grouped_mm is
not an autocast op, so its inputs and weights are cast to bf16 explicitly (with --precision fp32
torch runs it through its fallback, a loop of mm with a host read of the offsets). Before timing, every MoE
variant checks this path against a plain loop over the experts (forward and the gradients of the
input and of every MoE parameter, on the same weights and 4096 random tokens, under the same
precision) and the JSON records the relative differences ("grouped_check").

Precision: fp32 parameters; forward under torch.autocast("cuda", dtype=torch.bfloat16)
(--precision fp32: no autocast, for completeness). Optimizer: torch.optim.AdamW(lr 6e-4, betas
(0.9, 0.95), eps 1e-8, fused=True on CUDA), weight decay 0.1 on parameters of 2 or more
dimensions only (as the C++ side, moe/nn/checks.hpp: so the stacked [N, F] expert biases decay,
as they do there).

Batch: --batch B = 8 sequences of --seq T = 1024 tokens (8192 tokens per step), the same ids as the
C++ benchmark: ids[i] = bits(42, 0, i) % V for i in [0, B*T] (bench/torch_train_common.bits, the
library's counter-based generator), tokens = ids[:-1], targets = ids[1:], both viewed [B, T].
--accumulation A (default 1): A micro-batches of B x T per optimizer step (the C++ benchmark's
ACCUMULATION), ids for i in [0, A*B*T], the m-th micro-batch rows [m B, (m+1) B) of the [A B, T] view;
each micro-batch's loss is divided by A before its backward, so the step's gradient is their mean.

Modes per variant: "eager", and "compile" = torch.compile(model) (default mode; --compile-mode
max-autotune-no-cudagraphs, say). Each (variant, mode) builds a fresh model and optimizer (seed
1337). A failure (compile unsupported, out of memory, ...) is recorded as that entry's "error"
with null figures, and the script goes on.

What is timed: one full training step,
    A times: with autocast: loss = model(tokens_m, targets_m) / A; loss.backward()
    clip_grad_norm_(params, 1.0); optimizer.step(); optimizer.zero_grad(set_to_none=True)
bracketed by torch.cuda.Event records (the GPU's time from the step's first launch to its last
kernel, nothing read back to the host inside the step: the losses are read after the timed steps).
--warmup steps first (eager, default 3; compile: --compile-warmup, default 6, the first of which
compiles forward and backward, its wall time is recorded as "first_step_s"), then --steps timed
steps (default 10): step_ms median and min, tokens_per_s = A*B*T / median step, and
torch.cuda.max_memory_allocated() over the entry (model, optimizer state, activations) in GiB.

MFU: the bf16 matmul peak is measured in the same run (torch.mm of n x n bf16 matrices, n = 8192,
and 16384 when 8192 is fast; the best of 20 timed reps of 5 calls each; TFLOP/s = 2 n^3 / time;
the larger figure is the peak). MFU = tokens_per_s * flops_per_token / peak, with (the C++
benchmark uses the same formula)

    flops_per_token = 6 * P_active + 6 * V * H + 12 * L * H * T
    P_active        = L * (4 H^2                      c_attn 3 H^2 + c_proj H^2
                           + 2 H F                    dense MLP, or
                           + k * 2 H F                MoE: the k experts a token visits
                           + H N)                     linear router only

biases, LayerNorms and position embeddings ignored; 6 V H is the tied output projection; 12 L H T
is attention's QK^T and AV (T = the sequence length; causal masking not discounted, as llm.c and
PaLM count it). --spec-tflops adds an MFU against a datasheet figure. For GPT-2 small at T = 1024:
self 1.194e9, linear 1.195e9, dense 0.854e9 FLOPs per token.

Each entry also records the first and last step's loss, and max_expert_fraction: the busiest
expert's share of a layer's router choices, the worst layer, on one eager forward after the timed
steps (imbalance costs time in every MoE implementation, so it is printed beside the speed).

  python3 bench/gpu/torch_gpt2_cuda.py --out torch_gpt2_cuda.json     # everything, one JSON
  python3 bench/gpu/torch_gpt2_cuda.py --mode eager --out eager.json  # eager only: about a minute
  python3 bench/gpu/torch_gpt2_cuda.py --variant self --compile-mode max-autotune-no-cudagraphs
  /usr/bin/python3 bench/gpu/torch_gpt2_cuda.py --device cpu --smoke  # the script's logic, no GPU

--device cpu --smoke: a tiny config (L=2, H=64, 4 heads, V=256, context 32, F=128; batch 2 x 32)
in fp32 on the CPU, timed with time.perf_counter, torch._grouped_mm replaced by a per-group
reference matmul, plain AdamW, compile skipped; it asserts that the grouped path equals the loop
(relative difference < 1e-5) and that the self variant's loss decreases: a check of this script
(it runs on torch 1.13), not a benchmark.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass

try:
    import torch
    import torch.nn.functional as F
    from torch import nn

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.join(here, ".."), os.path.join(here, "..", "..", "tests", "torch_parity")]
    import gpt2_torch  # noqa: E402  (GPT-2's initialisation, shared with the parity tests' model)
    from torch_moe_cuda import grouped_mm_function  # noqa: E402  (torch._grouped_mm, or a CPU stand-in)
    from torch_train_common import bits, environment  # noqa: E402
except ImportError:  # --help and py_compile work without torch
    torch = F = None
    nn = None

VARIANTS = ("self", "linear", "dense")
MODES = ("eager", "compile")
LAYERNORM_EPS = 1e-5
GROUP_ALIGN = 8          # rows per padded expert group: 16 bytes of bf16, for grouped_mm's backward
DATA_SEED = 42
MODEL_SEED = 1337
CHECK_TOKENS = 4096      # tokens of the grouped-vs-loop check
CHECK_TOLERANCE = {"bf16": 2e-2, "fp32": 1e-5}
PEAK_SIZES = (8192, 16384)
PEAK_REPS, PEAK_CALLS = 20, 5
PEAK_LARGE_IF_UNDER_S = 0.02  # measure n = 16384 only if one 8192 matmul took less than this
LR = 6e-4


@dataclass
class Config:
    vocab: int = 50257   # V
    context: int = 1024  # maxT
    layers: int = 12     # L
    heads: int = 12
    hidden: int = 768    # H
    ffn: int = 3072      # F, of the dense MLP and of each expert
    experts: int = 8     # N
    top_k: int = 2       # k


GPT2_SMALL = Config()
SMOKE = Config(vocab=256, context=32, layers=2, heads=4, hidden=64, ffn=128)
SMOKE_BATCH, SMOKE_SEQ = 2, 32


# ---- attention and the dense MLP ------------------------------------------------------------

class CausalSelfAttention(nn.Module if nn else object):
    def __init__(self, config):
        super().__init__()
        self.heads = config.heads
        self.c_attn = nn.Linear(config.hidden, 3 * config.hidden)  # rows q | k | v
        self.c_proj = nn.Linear(config.hidden, config.hidden)

    def forward(self, x):  # [B, T, H] -> [B, T, H]
        B, T, H = x.shape
        q, k, v = self.c_attn(x).split(H, dim=2)
        q, k, v = (part.view(B, T, self.heads, H // self.heads).transpose(1, 2) for part in (q, k, v))
        y = causal_attention(q, k, v)  # [B, NH, T, hs]
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H))


def causal_attention(q, k, v):
    """Flash / memory-efficient attention where torch has it (2.0+); torch 1.13 (the CPU smoke
    check) lacks scaled_dot_product_attention and gets the explicit masked softmax."""
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v


class MLP(nn.Module if nn else object):
    """GPT-2's MLP: H -> F (bias), tanh-GELU, F -> H (bias)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden, config.ffn)
        self.c_proj = nn.Linear(config.ffn, config.hidden)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


# ---- the MoE layer: stacked experts, grouped GEMMs ------------------------------------------

class StackedLinear(nn.Module if nn else object):
    """N experts' nn.Linear(in, out) stacked: weight [N, out, in], bias [N, out]."""

    def __init__(self, experts, fan_in, fan_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, fan_out, fan_in))
        self.bias = nn.Parameter(torch.zeros(experts, fan_out))


def dispatch_padded(x, flat, k, N, align):
    """bench/gpu/torch_moe_cuda.py's padded dispatch: the T*k slots (slot t*k + j = token t's j-th
    choice, flat[slot] its expert) stably sorted by expert, each expert's group padded with zero
    rows to a multiple of `align`. The row count is a static bound, so there is no host sync and
    no data-dependent shape (torch.compile traces one graph); the last group takes the slack.
    Counts use scatter_add_ and the row -> expert map searchsorted, not bincount and
    repeat_interleave, for the same reason.
    Returns rows [R_max, H] (x's rows in padded expert order), offs (int32 group ends),
    expert_of_row [R_max] and slot_row [T*k] (the padded row of each slot)."""
    T, H = x.shape
    R = flat.numel()
    expert_sorted, order = torch.sort(flat, stable=True)               # order[i]: the i-th slot in expert order
    counts = torch.zeros(N, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + align - 1) // align * align
    rows_max = (R + N * (align - 1) + align - 1) // align * align
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    ends[-1] = rows_max                                                # the slack: zero rows of the last group
    first = torch.cumsum(counts, 0) - counts                           # each expert's first sorted slot
    position = torch.arange(R, device=x.device)
    dest = starts[expert_sorted] + position - first[expert_sorted]     # padded row of each sorted slot
    src = torch.full((rows_max,), T, dtype=torch.long, device=x.device)  # T: the appended zero row
    src[dest] = order // k
    rows = torch.cat([x, x.new_zeros(1, H)]).index_select(0, src)
    # Row r belongs to the first group whose end is past r.
    expert_of_row = torch.searchsorted(ends, torch.arange(rows_max, device=x.device), right=True)
    slot_row = torch.empty_like(order)
    slot_row[order] = dest
    return rows, ends.to(torch.int32), expert_of_row, slot_row


class GroupedExperts(nn.Module if nn else object):
    """N GELU-MLP experts (fc: H -> F, proj: F -> H, biases) run as grouped GEMMs."""

    def __init__(self, config, grouped_mm, compute_dtype):
        super().__init__()
        self.count = config.experts
        self.fc = StackedLinear(config.experts, config.hidden, config.ffn)
        self.proj = StackedLinear(config.experts, config.ffn, config.hidden)
        self.grouped_mm = grouped_mm
        # grouped_mm is not an autocast op: the GEMM inputs are cast here (bf16 under --precision bf16).
        self.compute_dtype = compute_dtype

    def cast(self, t):
        return t.to(self.compute_dtype)

    def forward(self, x, top_experts, weights):
        """x [T, H], top_experts [T, k], weights [T, k] -> y [T, H]."""
        T, H = x.shape
        k = top_experts.shape[1]
        rows, offs, expert_of_row, slot_row = dispatch_padded(self.cast(x), top_experts.reshape(-1), k,
                                                              self.count, GROUP_ALIGN)
        # grouped_mm(a, b): a [R, K] @ b[g] [K, out] per group; b = the [N, out, K] weights transposed.
        # The bias gather is an embedding lookup: its backward is a sorted segment sum on CUDA,
        # where index_select's index_add_ would pile R atomic adds onto N rows.
        h = self.grouped_mm(rows, self.cast(self.fc.weight).transpose(-2, -1), offs=offs)
        h = F.gelu(h + F.embedding(expert_of_row, self.cast(self.fc.bias)), approximate="tanh")
        out = self.grouped_mm(h, self.cast(self.proj.weight).transpose(-2, -1), offs=offs)
        out = out + F.embedding(expert_of_row, self.cast(self.proj.bias))
        out = out.index_select(0, slot_row).view(T, k, H)              # back to slot order
        return (out * weights.to(out.dtype).unsqueeze(-1)).sum(dim=1)

    def loop_reference(self, x, top_experts, weights):
        """The same experts as a plain loop (one expert's tokens at a time): the check's reference."""
        x = self.cast(x)
        y = torch.zeros_like(x)
        for e in range(self.count):
            token, choice = torch.where(top_experts == e)
            if token.numel() == 0:
                continue
            h = x.index_select(0, token) @ self.cast(self.fc.weight[e]).t() + self.cast(self.fc.bias[e])
            h = F.gelu(h, approximate="tanh") @ self.cast(self.proj.weight[e]).t() + self.cast(self.proj.bias[e])
            y.index_add_(0, token, h * weights[token, choice].to(h.dtype).unsqueeze(1))
        return y


class MoE(nn.Module if nn else object):
    def __init__(self, config, variant, grouped_mm, compute_dtype):
        super().__init__()
        H, N = config.hidden, config.experts
        if variant == "self" and H < N:
            raise ValueError(f"self routing reads N = {N} coordinates but H = {H}")
        self.variant, self.top_k, self.count = variant, config.top_k, N
        if variant == "linear":
            self.router = nn.Linear(H, N, bias=False)
        self.experts = GroupedExperts(config, grouped_mm, compute_dtype)
        self.choice_counts = None  # a list while routing_balance() collects statistics

    def route(self, x):
        """x [T, H] -> top_experts [T, k], weights [T, k] (float32, softmax over the k selected)."""
        if self.variant == "self":
            logits = x[:, x.shape[1] - self.count:]  # the last N coordinates (a view: x gets the gradient)
        else:
            logits = self.router(x)
        # topk: equal logits (rare in practice) are not ordered by the library's lower-index rule
        # (gpt2_torch.py's stable sort); that changes no timing, and the check routes both paths alike.
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)
        if self.choice_counts is not None:
            self.choice_counts.append(torch.bincount(top_experts.reshape(-1), minlength=self.count))
        return top_experts, top_logits.float().softmax(dim=-1)

    def forward(self, x):  # [T, H] -> [T, H]
        top_experts, weights = self.route(x)
        return self.experts(x, top_experts, weights)


# ---- the model ------------------------------------------------------------------------------

def on_device(device):
    """Build modules directly on the device (torch 2.x: torch.device is a context manager), so
    the 521M parameters of the MoE model are not initialised on the CPU first."""
    return device if hasattr(device, "__enter__") else contextlib.nullcontext()


class Block(nn.Module if nn else object):
    def __init__(self, config, variant, grouped_mm, compute_dtype):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden, eps=LAYERNORM_EPS)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden, eps=LAYERNORM_EPS)
        if variant == "dense":
            self.mlp = MLP(config)
        else:
            self.moe = MoE(config, variant, grouped_mm, compute_dtype)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)
        if hasattr(self, "mlp"):
            return x + self.mlp(h)
        return x + self.moe(h.reshape(-1, h.shape[-1])).view_as(h)  # the B*T tokens as one batch


class GPT(nn.Module if nn else object):
    def __init__(self, config, variant, grouped_mm, compute_dtype):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r} (valid: {', '.join(VARIANTS)})")
        self.config, self.variant = config, variant
        self.wte = nn.Embedding(config.vocab, config.hidden)
        self.wpe = nn.Embedding(config.context, config.hidden)
        self.h = nn.ModuleList(Block(config, variant, grouped_mm, compute_dtype) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.hidden, eps=LAYERNORM_EPS)
        gpt2_torch.init_gpt2_(self, config.hidden, config.layers)

    def forward(self, tokens, targets):
        """tokens, targets [B, T] int64 -> the mean cross-entropy (only the loss: logits [B*T, V]
        are the largest activation and nobody reads them here)."""
        B, T = tokens.shape
        x = self.wte(tokens) + self.wpe(torch.arange(T, device=tokens.device))
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied: the output projection is wte
        return F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1))

    def moe_layers(self):
        return [block.moe for block in self.h if hasattr(block, "moe")]


# ---- FLOPs and the matmul peak ----------------------------------------------------------------

def active_parameters(config, variant):
    """P_active of the docstring: the matrix parameters one token multiplies with, per step."""
    H, Fd, N, k = config.hidden, config.ffn, config.experts, config.top_k
    per_layer = 4 * H * H
    if variant == "dense":
        per_layer += 2 * H * Fd
    else:
        per_layer += k * 2 * H * Fd + (H * N if variant == "linear" else 0)
    return config.layers * per_layer


def flops_per_token(config, variant, seq):
    """6 P_active + 6 V H (tied output projection) + 12 L H T (attention, causal not discounted)."""
    return (6 * active_parameters(config, variant) + 6 * config.vocab * config.hidden
            + 12 * config.layers * config.hidden * seq)


def measure_matmul_peak(device):
    """The device's bf16 GEMM rate as torch.mm reaches it: best of PEAK_REPS timed reps of
    PEAK_CALLS n x n products (TFLOP/s = 2 n^3 / time); n = 16384 only when 8192 is fast.
    On the CPU (the smoke check) a small float32 product, only so the code path runs."""
    if device.type != "cuda":
        sizes, dtype = (256,), torch.float32
    else:
        sizes, dtype = PEAK_SIZES, torch.bfloat16
    by_size = {}
    for n in sizes:
        seconds = seconds_per_matmul(n, dtype, device)
        by_size[str(n)] = 2.0 * n ** 3 / seconds / 1e12
        if seconds > PEAK_LARGE_IF_UNDER_S:
            break
    empty_cache(device)
    return {"dtype": str(dtype).replace("torch.", ""), "op": "torch.mm n x n",
            "reps": f"best of {PEAK_REPS} reps of {PEAK_CALLS} calls",
            "tflops_by_n": by_size, "tflops": max(by_size.values())}


def seconds_per_matmul(n, dtype, device):
    """Seconds per torch.mm call on n x n matrices: the fastest of PEAK_REPS + 1 timed reps of
    PEAK_CALLS calls (the first rep doubles as the warm-up: being slower, it never wins)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def calls():
        for _ in range(PEAK_CALLS):
            torch.mm(a, b, out=c)

    return min(timed_call(calls, device) for _ in range(PEAK_REPS + 1)) / PEAK_CALLS  # +1: the warm-up rep


def timed_call(fn, device):
    """Seconds of one fn() call: CUDA events on the GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- the batch, the optimizer, the step -------------------------------------------------------

def make_batch(vocab, batch, seq, device):
    """The C++ benchmark's token ids: ids[i] = bits(42, 0, i) % V, i in [0, B*T]."""
    ids = [bits(DATA_SEED, 0, i) % vocab for i in range(batch * seq + 1)]
    tokens = torch.tensor(ids[:-1], dtype=torch.long).view(batch, seq)
    targets = torch.tensor(ids[1:], dtype=torch.long).view(batch, seq)
    return tokens.to(device), targets.to(device)


def make_optimizer(model, device):
    """AdamW as the C++ side; fused on CUDA (one kernel for all parameters). Returns the
    optimizer and what it runs as ("fused", or "foreach"/"default" where fused is unavailable)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    options = dict(lr=LR, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        try:
            return torch.optim.AdamW(groups, fused=True, **options), "fused"
        except (TypeError, RuntimeError) as e:  # an old torch: note it, use the multi-tensor form
            print(f"torch_gpt2_cuda: fused AdamW unavailable ({error_text(e)}), using foreach", file=sys.stderr)
            return torch.optim.AdamW(groups, foreach=True, **options), "foreach"
    return torch.optim.AdamW(groups, **options), "default"


def precision_context(device, precision):
    """A fresh context manager per use: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_train_step(forward, optimizer, params, tokens, targets, device, precision, accumulation):
    """One optimizer step over `accumulation` micro-batches: the rows of tokens/targets split evenly."""
    micro_tokens, micro_targets = tokens.chunk(accumulation), targets.chunk(accumulation)

    def step():
        total = None
        for tokens_m, targets_m in zip(micro_tokens, micro_targets):
            with precision_context(device, precision):
                loss = forward(tokens_m, targets_m) / accumulation
            loss.backward()  # outside autocast, as recommended: backward runs in the forward's dtypes
            total = loss.detach() if total is None else total + loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total  # not .item(): a host sync inside the step would stall the launches
    return step


# ---- the grouped-vs-loop check ------------------------------------------------------------------

def rel_diff(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


def check_grouped_against_loop(moe, hidden, device, precision, tokens):
    """The grouped expert path against the loop reference on the same weights (one MoE layer) and
    random N(0, 1) inputs: the forward and the gradients of x and of every MoE parameter."""
    gen = torch.Generator(device="cpu").manual_seed(7)
    x = torch.randn(tokens, hidden, generator=gen).to(device).requires_grad_(True)
    dy = torch.randn(tokens, hidden, generator=gen).to(device)
    names = ["x"] + [name for name, _ in moe.named_parameters()]
    inputs = [x] + [p for _, p in moe.named_parameters()]

    def run(experts_fn):  # routes afresh each time, so the two graphs share nothing
        with precision_context(device, precision):
            top_experts, weights = moe.route(x)
            y = experts_fn(x, top_experts, weights)
        return y, torch.autograd.grad(y, inputs, dy.to(y.dtype))

    y_loop, g_loop = run(moe.experts.loop_reference)
    y_grouped, g_grouped = run(moe.experts)
    result = {"tokens": tokens, "precision": precision, "forward_rel_diff": rel_diff(y_loop, y_grouped),
              "grad_rel_diff": {n: rel_diff(a, b) for n, a, b in zip(names, g_loop, g_grouped)}}
    result["max_rel_diff"] = max([result["forward_rel_diff"]] + list(result["grad_rel_diff"].values()))
    result["tolerance"] = CHECK_TOLERANCE[precision]
    result["ok"] = result["max_rel_diff"] < result["tolerance"]
    return result


# ---- one (variant, mode) entry ---------------------------------------------------------------

def routing_balance(model, tokens, targets, device, precision):
    """The busiest expert's share of a layer's router choices, the worst layer (1/N = balanced),
    on one eager forward after the timed steps: imbalance costs time, so it is printed beside it."""
    layers = model.moe_layers()
    if not layers:
        return None
    for layer in layers:
        layer.choice_counts = []
    with torch.no_grad(), precision_context(device, precision):
        model(tokens, targets)
    worst = max(float(layer.choice_counts[0].max()) / float(layer.choice_counts[0].sum()) for layer in layers)
    for layer in layers:
        layer.choice_counts = None
    return worst


def time_steps(step, device, warmup, steps):
    """Runs warm-up then timed steps. Returns first-step seconds, step ms list, the losses."""
    losses = []
    t0 = time.perf_counter()
    losses.append(step())
    synchronize(device)
    first_step_s = time.perf_counter() - t0  # with compile: compiling forward and backward
    for _ in range(warmup - 1):
        losses.append(step())
    synchronize(device)
    times_ms = []
    if device.type == "cuda":
        events = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step())
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        times_ms = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(steps):
            t = time.perf_counter()
            losses.append(step())
            times_ms.append((time.perf_counter() - t) * 1e3)
    return first_step_s, times_ms, [float(loss) for loss in losses]


def bench_entry(entry, variant, mode, config, args, device, tokens, targets, grouped_mm, peak, check):
    """Fills `entry` for one (variant, mode); raises on failure (the caller records it)."""
    A = args.accumulation
    B, T = tokens.shape[0] // A, tokens.shape[1]
    compute_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(MODEL_SEED)
    with on_device(device):
        model = GPT(config, variant, grouped_mm, compute_dtype).to(device)
    optimizer, optimizer_kind = make_optimizer(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    entry["params_total"] = sum(p.numel() for p in params)
    entry["optimizer"] = optimizer_kind
    if check is not None:
        entry["grouped_check"] = check
    forward = model
    if mode == "compile":
        if not hasattr(torch, "compile"):
            raise RuntimeError(f"torch {torch.__version__} has no torch.compile")
        reset_dynamo()  # a fresh cache per model: no recompile limits carried over
        forward = torch.compile(model, mode=args.compile_mode)
    step = make_train_step(forward, optimizer, params, tokens, targets, device, args.precision, A)
    warmup = args.compile_warmup if mode == "compile" else args.warmup
    first_step_s, times_ms, losses = time_steps(step, device, max(warmup, 1), args.steps)

    median_ms = statistics.median(times_ms)
    tokens_per_s = A * B * T / (median_ms / 1e3)
    entry.update({
        "tokens_per_s": tokens_per_s,
        "step_ms_median": median_ms,
        "step_ms_min": min(times_ms),
        "step_ms": times_ms,
        "first_step_s": first_step_s,
        "mfu": tokens_per_s * entry["flops_per_token"] / (peak["tflops"] * 1e12),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    })
    if args.spec_tflops:
        entry["mfu_vs_spec"] = tokens_per_s * entry["flops_per_token"] / (args.spec_tflops * 1e12)
    if device.type == "cuda":
        entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        entry["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
    try:  # a statistic beside the figures: its failure must not void them
        entry["max_expert_fraction"] = routing_balance(model, tokens[:B], targets[:B], device, args.precision)
    except Exception as e:
        entry["max_expert_fraction_error"] = error_text(e)


def empty_entry(variant, mode, config, args, seq):
    return {
        "variant": variant, "mode": mode,
        "compile_mode": (args.compile_mode or "default") if mode == "compile" else None,
        "precision": args.precision,
        "flops_per_token": flops_per_token(config, variant, seq),
        "params_active": active_parameters(config, variant),
        "tokens_per_s": None, "step_ms_median": None, "step_ms_min": None, "peak_memory_gib": None,
        "mfu": None, "error": None,
    }


def summary_line(e):
    name = f"{e['variant']}/{e['mode']}" + (f"({e['compile_mode']})" if e.get("compile_mode") else "")
    if e["error"] == "skipped on cpu":
        return f"torch_gpt2_cuda: {name}: skipped on cpu"
    if e["error"]:
        return f"torch_gpt2_cuda: {name}: ERROR {e['error'].splitlines()[0][:300]}"
    memory = f", peak {e['peak_memory_gib']:.1f} GiB" if e.get("peak_memory_gib") is not None else ""
    balance = (f", max expert fraction {e['max_expert_fraction']:.3f}"
               if e.get("max_expert_fraction") is not None else "")
    return (f"torch_gpt2_cuda: {name}: {e['tokens_per_s']:,.0f} tokens/s, {e['step_ms_median']:.2f} ms/step "
            f"(min {e['step_ms_min']:.2f}), MFU {100 * e['mfu']:.1f}%{memory}, "
            f"loss {e['loss_first']:.4f} -> {e['loss_last']:.4f}{balance}")


# ---- helpers -----------------------------------------------------------------------------------

def error_text(e, limit=4000):
    """The exception's type and message, cut to `limit` characters (inductor's are pages long)."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " [...]"


def reset_dynamo():
    """torch._dynamo.reset() where torch.compile has been used (the module is then imported)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device):
    """Frees what the last entry left: dynamo's cache (it holds the compiled model), then memory."""
    reset_dynamo()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_check(variant, config, args, device, grouped_mm):
    """The grouped-vs-loop check on layer 0 of a fresh model of this variant (dense: none)."""
    if variant == "dense":
        return None
    compute_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(MODEL_SEED)
    with on_device(device):
        moe = MoE(config, variant, grouped_mm, compute_dtype).to(device)
    gpt2_torch.init_gpt2_(moe, config.hidden, config.layers)
    try:
        tokens = min(CHECK_TOKENS, args.batch * args.seq)
        result = check_grouped_against_loop(moe, config.hidden, device, args.precision, tokens)
    except Exception as e:  # grouped_mm unsupported here, say: the timed entries will say it too
        traceback.print_exc()
        result = {"error": error_text(e), "ok": False}
    del moe
    empty_cache(device)
    verdict = "ok" if result.get("ok") else "FAILED"
    print(f"torch_gpt2_cuda: {variant}: grouped vs loop check {verdict}: "
          f"{result.get('max_rel_diff', result.get('error'))}", file=sys.stderr, flush=True)
    return result


def gpu_environment(device):
    env = environment()
    env.update({"cuda": torch.version.cuda, "platform": platform.platform()})
    if hasattr(torch, "get_float32_matmul_precision"):  # what --precision fp32's matmuls run as
        env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                    "gpu_memory_gib": props.total_memory / 2 ** 30,
                    "cudnn": torch.backends.cudnn.version()})
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or "cpu"
    return env


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the JSON to this file, rewritten after every entry (default: stdout)")
    parser.add_argument("--variant", choices=VARIANTS, action="append", help="repeatable (default: all three)")
    parser.add_argument("--mode", choices=MODES, action="append", help="repeatable (default: eager and compile)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: torch's default)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="bf16: autocast over fp32 weights (default); fp32: no autocast")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; smoke 2)")
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro-batches of --batch sequences per optimizer step (default 1)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; smoke 32)")
    parser.add_argument("--warmup", type=int, default=3, help="eager warm-up steps (default 3)")
    parser.add_argument("--compile-warmup", type=int, default=6,
                        help="compiled warm-up steps, the first compiles (default 6)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per entry (default 10)")
    parser.add_argument("--spec-tflops", type=float, default=None,
                        help="also report MFU against this datasheet bf16 dense TFLOP/s")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the script only)")
    parser.add_argument("--smoke", action="store_true", help="the tiny config instead of GPT-2 small")
    return parser.parse_args()


def smoke_assertions(report):
    """--smoke: the grouped path equals the loop, and Self-Routing training lowers the loss."""
    for e in report["entries"]:
        if e["mode"] == "compile" and report["device_type"] != "cuda":
            assert e["error"] == "skipped on cpu", e
            continue
        assert e["error"] is None, f"{e['variant']}/{e['mode']}: {e['error']}"
        if e["variant"] != "dense":
            check = e["grouped_check"]
            assert check["ok"], f"{e['variant']}: grouped path differs from the loop: {check}"
        if e["variant"] == "self":
            assert e["loss_last"] < e["loss_first"], \
                f"self: loss did not decrease: {e['loss_first']} -> {e['loss_last']}"
    print("torch_gpt2_cuda: smoke assertions passed", file=sys.stderr)


def main():
    args = parse_args()
    if torch is None:
        sys.exit("torch_gpt2_cuda: PyTorch is not installed for this python")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_gpt2_cuda: no CUDA device (use --device cpu --smoke to check the script)")
    if device.type == "cpu":
        if not args.smoke:
            sys.exit("torch_gpt2_cuda: --device cpu only with --smoke (GPT-2 small MoE does not fit a CPU benchmark)")
        args.precision = "fp32"  # the CPU check compares with a 1e-5 tolerance, in float32
    config = SMOKE if args.smoke else GPT2_SMALL
    args.batch = args.batch or (SMOKE_BATCH if args.smoke else 8)
    args.seq = args.seq or (SMOKE_SEQ if args.smoke else config.context)
    if args.seq > config.context:
        sys.exit(f"torch_gpt2_cuda: --seq {args.seq} exceeds the context {config.context}")
    variants = args.variant or list(VARIANTS)
    modes = args.mode or list(MODES)

    if args.accumulation < 1:
        sys.exit(f"torch_gpt2_cuda: --accumulation {args.accumulation} must be >= 1")
    tokens, targets = make_batch(config.vocab, args.accumulation * args.batch, args.seq, device)
    report = {
        "benchmark": "torch_gpt2_cuda",
        "environment": gpu_environment(device),
        "device_type": device.type,
        "config": asdict(config),
        "batch": {"sequences": args.batch, "accumulation": args.accumulation, "seq": args.seq,
                  "tokens_per_step": args.accumulation * args.batch * args.seq,
                  "data": f"ids[i] = bits({DATA_SEED}, 0, i) % V"},
        "precision": args.precision if device.type == "cuda" else "fp32 (cpu smoke check)",
        "optimizer": "AdamW lr 6e-4, betas (0.9, 0.95), eps 1e-8, wd 0.1 on dim >= 2; clip_grad_norm_ 1.0",
        "moe": {"experts": config.experts, "top_k": config.top_k, "weights": "softmax over the top-k logits",
                "dispatch": f"argsort, groups padded to multiples of {GROUP_ALIGN} rows",
                "grouped_mm": "torch._grouped_mm" if device.type == "cuda" else "per-group reference (cpu)"},
        "timing": {"warmup": args.warmup, "compile_warmup": args.compile_warmup, "steps": args.steps,
                   "clock": "torch.cuda.Event per step" if device.type == "cuda" else "time.perf_counter"},
        "flops_per_token_formula": "6*P_active + 6*V*H + 12*L*H*T; P_active = L*(4H^2 + dense 2HF | MoE k*2HF "
                                   "(+ H*N linear router))",
        "peak": None,
        "entries": [],
    }

    def save():  # the whole report so far (to stdout only once, at the end)
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(report, indent=2) + "\n")

    report["peak"] = peak = measure_matmul_peak(device)
    by_n = ", ".join(f"n={n}: {v:.1f}" for n, v in peak["tflops_by_n"].items())
    print(f"torch_gpt2_cuda: measured {peak['dtype']} matmul peak {peak['tflops']:.1f} TFLOP/s ({by_n})",
          file=sys.stderr, flush=True)
    save()

    grouped_mm = None
    try:
        grouped_mm = grouped_mm_function(device)
    except RuntimeError as e:
        report["grouped_mm_error"] = error_text(e)

    for variant in variants:
        check = None
        if grouped_mm is not None:
            check = run_check(variant, config, args, device, grouped_mm)
        for mode in modes:
            entry = empty_entry(variant, mode, config, args, args.seq)
            report["entries"].append(entry)
            if mode == "compile" and device.type != "cuda":
                entry["error"] = "skipped on cpu"
            elif variant != "dense" and grouped_mm is None:
                entry["error"] = report["grouped_mm_error"]
            else:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    bench_entry(entry, variant, mode, config, args, device, tokens, targets, grouped_mm, peak, check)
                except Exception as e:  # compile unsupported, out of memory, ...: record, go on
                    traceback.print_exc()
                    entry["error"] = error_text(e)
                    entry["tokens_per_s"] = entry["mfu"] = None
                empty_cache(device)
            print(summary_line(entry), file=sys.stderr, flush=True)
            save()

    save()
    if not args.out:
        print(json.dumps(report, indent=2))
    if args.smoke:
        smoke_assertions(report)


if __name__ == "__main__":
    main()
