#!/usr/bin/env python3
"""PyTorch peers of bench_moe_cuda on the same GPU, bf16, the same shapes. Prints (or writes) JSON.

Per shape (gpt2_T16384, gpt2_T1024: H=768, F=3072, GELU MLP with biases; mixtral_T4096:
H=4096, F=14336, SwiGLU without biases; N=8 experts, top-2 everywhere):

  loop        the common eager MoE: a Linear router, topk, softmax over the k selected logits,
              then a Python loop over the experts that selects each expert's tokens, runs its
              MLP (separate weights per expert, as nn.ModuleList of nn.Linear) and index_add_s
              the weighted output back into the tokens. Forward and forward + backward.
  grouped_mm  torch._grouped_mm with argsort dispatch: the (token, choice) slots stably sorted
              by expert, offsets = cumsum of the per-expert counts (int32), one grouped GEMM per
              projection over all experts (GPT-2: biases added per row with a gather, GELU tanh;
              Mixtral: silu(gate) * up), then the rows gathered back into slot order and summed
              per token with the routing weights. Forward, and forward + backward when autograd
              supports it (null and an error message otherwise). For forward + backward each
              expert's group is padded to a multiple of 8 rows (torchtitan's way): the weight
              gradient contracts over a group's rows and the kernel needs 16-byte-aligned groups.
  hf_mixtral  transformers' MixtralSparseMoeBlock built from a MixtralConfig with this shape.
              Forward only. Its experts are always SwiGLU (for the GPT-2 shapes that is not
              GPT-2's GELU MLP: the JSON says so).
  floor_mm    the dense floor at the same FLOPs: T*k rows through ONE expert's two GEMMs with
              torch.mm (no routing, no bias, no activation); ten calls per timed iteration, so
              launch latency is hidden (bench_moe_cuda's floor does the same).

Timing: torch.cuda.Event around each iteration after a warm-up (at least 3 runs and 0.1 s);
the median (and the minimum) over the iterations, in ms. "forward" runs under torch.no_grad()
(the faster, inference form); "forward_grad" with autograd recording (what a training step
runs); "forward_backward" also calls backward(dy) with x.requires_grad, so d(x) is produced as
bench_moe_cuda's layer does; parameter gradients are reset to None between iterations (outside
the timed region, as optimizer.zero_grad(set_to_none=True) would).

Before timing, loop and grouped_mm (plain and padded dispatch) run on the same weights and input
(the first 512 tokens) and the JSON records their relative differences: a check that the grouped
paths compute the same MoE. The JSON file is rewritten after every step, so a crash keeps what was
measured before it.

  python3 bench/gpu/torch_moe_cuda.py --out torch_cuda.json       # ~1-2 minutes on an H100
  python3 bench/gpu/torch_moe_cuda.py --device cpu --smoke         # the script's logic, tiny shape, no GPU

(--device cpu times with time.perf_counter and replaces torch._grouped_mm by a per-group
reference: a check of this script, not a benchmark.)
"""
import argparse
import json
import platform
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # --help and py_compile work without torch
    torch = None
    F = None

SHAPES = [
    # name, H, F, N, k, T, experts
    ("gpt2_T16384", 768, 3072, 8, 2, 16384, "gelu"),
    ("gpt2_T1024", 768, 3072, 8, 2, 1024, "gelu"),
    ("mixtral_T4096", 4096, 14336, 8, 2, 4096, "swiglu"),
]
SMOKE_SHAPES = [("smoke_gelu", 64, 128, 8, 2, 256, "gelu"), ("smoke_swiglu", 64, 96, 8, 2, 256, "swiglu")]

FLOOR_BATCH = 10
GROUP_ALIGN = 8  # rows per padded group for grouped_mm's backward: 16 bytes of bf16
CHECK_TOKENS = 512
MIN_WARMUP_RUNS = 3
MIN_WARMUP_SECONDS = 0.1


# ---- timing --------------------------------------------------------------------------------------

def timed(fn, device, iterations, batch=1, setup=None):
    """Median and minimum ms per call of fn over `iterations` timed iterations, after a warm-up."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    runs = 0
    while runs < MIN_WARMUP_RUNS or time.perf_counter() - t0 < MIN_WARMUP_SECONDS:
        if setup:
            setup()
        fn()
        sync()
        runs += 1
    times = []
    for _ in range(iterations):
        if setup:
            setup()
        sync()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(batch):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / batch)
        else:
            t = time.perf_counter()
            for _ in range(batch):
                fn()
            times.append((time.perf_counter() - t) * 1e3 / batch)
    return statistics.median(times), min(times)


def record(result, name, fn, device, iterations, **kwargs):
    """result[name + '_ms'] = median ms (and _min_ms), or None and result[name + '_error']."""
    try:
        median, fastest = timed(fn, device, iterations, **kwargs)
        result[name + "_ms"], result[name + "_min_ms"] = median, fastest
    except Exception as e:  # an unsupported op or out of memory: report it, keep going
        result[name + "_ms"] = None
        result[name + "_error"] = error_text(e)


def error_text(e):
    return f"{type(e).__name__}: {e}"


# ---- weights: per-expert tensors for the loop, stacked copies for grouped_mm ----------------------

def make_loop_weights(H, Fd, N, kind, device, dtype):
    def normal(*shape, std):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * std).to(dtype)

    # GPT-2-like N(0, 0.02) experts; an N(0, 1/H) router gives unit-variance logits on unit-variance x.
    w = {"router": normal(N, H, std=H ** -0.5)}
    if kind == "gelu":
        w["fc_w"] = [normal(Fd, H, std=0.02) for _ in range(N)]
        w["fc_b"] = [torch.zeros(Fd, device=device, dtype=dtype) for _ in range(N)]
        w["proj_w"] = [normal(H, Fd, std=0.02) for _ in range(N)]
        w["proj_b"] = [torch.zeros(H, device=device, dtype=dtype) for _ in range(N)]
    else:  # Mixtral's w1 (gate), w3 (up), w2 (down)
        w["w1"] = [normal(Fd, H, std=0.02) for _ in range(N)]
        w["w3"] = [normal(Fd, H, std=0.02) for _ in range(N)]
        w["w2"] = [normal(H, Fd, std=0.02) for _ in range(N)]
    return w


def stacked_weights(w, kind):
    """The loop's weights as [N, out, in] tensors (copies, so each path owns its gradients)."""
    g = {"router": w["router"].clone()}
    if kind == "gelu":
        for name in ("fc_w", "fc_b", "proj_w", "proj_b"):
            g[name] = torch.stack(w[name])
    else:
        g["gate_up_w"] = torch.stack([torch.cat([w1, w3]) for w1, w3 in zip(w["w1"], w["w3"])])  # [N, 2F, H]
        g["down_w"] = torch.stack(w["w2"])
    return g


def parameters(w):
    for value in w.values():
        yield from (value if isinstance(value, list) else [value])


def requires_grad(w):
    for p in parameters(w):
        p.requires_grad_(True)


def clear_grads(w):
    for p in parameters(w):
        p.grad = None


# ---- (i) the eager loop over experts ------------------------------------------------------------

def route(w, x, k):
    logits = F.linear(x, w["router"])
    top_logits, top_experts = logits.topk(k, dim=-1)
    weights = top_logits.float().softmax(dim=-1).to(x.dtype)  # softmax over the k selected
    return top_experts, weights


def loop_forward(w, x, k, kind):
    top_experts, weights = route(w, x, k)
    N = w["router"].shape[0]
    y = torch.zeros_like(x)
    # mask[e, j, t]: token t's j-th choice is expert e
    mask = F.one_hot(top_experts, N).permute(2, 1, 0)
    for e in range(N):
        choice, token = torch.where(mask[e])
        if token.numel() == 0:
            continue
        h = x.index_select(0, token)
        if kind == "gelu":
            h = F.gelu(F.linear(h, w["fc_w"][e], w["fc_b"][e]), approximate="tanh")
            h = F.linear(h, w["proj_w"][e], w["proj_b"][e])
        else:
            h = F.linear(F.silu(F.linear(h, w["w1"][e])) * F.linear(h, w["w3"][e]), w["w2"][e])
        y.index_add_(0, token, h * weights[token, choice, None])
    return y


# ---- (ii) torch._grouped_mm with argsort dispatch ---------------------------------------------

def reference_grouped_mm(a, b, offs):
    """Per-group a[rows of g] @ b[g]: what grouped_mm computes, for --device cpu only."""
    out, start = [], 0
    for g, end in enumerate(offs.tolist()):
        out.append(a[start:end] @ b[g])
        start = end
    return torch.cat(out)


def grouped_mm_function(device):
    if device.type != "cuda":
        return reference_grouped_mm
    fn = getattr(torch, "_grouped_mm", None) or getattr(F, "grouped_mm", None)
    if fn is None:
        raise RuntimeError(f"torch {torch.__version__} has neither torch._grouped_mm nor F.grouped_mm")
    return fn


def dispatch_sorted(x, flat, k, N):
    """The plain recipe: slots stably sorted by expert, offsets = cumsum of the counts."""
    expert_of_row, order = torch.sort(flat, stable=True)               # order[r]: the slot of row r
    offs = torch.cumsum(torch.bincount(flat, minlength=N), 0, dtype=torch.int32)  # group ends
    rows = x.index_select(0, order // k)                               # [T*k, H] in expert order
    slot_row = torch.empty_like(order)
    slot_row[order] = torch.arange(order.numel(), device=x.device)     # the row of each slot
    return rows, offs, expert_of_row, slot_row


def dispatch_padded(x, flat, k, N, align):
    """The same with every group padded to a multiple of `align` rows by zero rows (torchtitan's
    way): grouped_mm's weight gradient contracts over each group's rows, and its kernel needs
    16-byte-aligned group starts there. The size is a static bound (no host sync); the last group
    takes the slack, so every row belongs to a group."""
    T, H = x.shape
    R = flat.numel()
    expert_sorted, order = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=N)
    padded = (counts + align - 1) // align * align
    rows_max = (R + N * (align - 1) + align - 1) // align * align
    starts = torch.cumsum(padded, 0) - padded
    ends = starts + padded
    ends[-1] = rows_max
    first = torch.cumsum(counts, 0) - counts                           # each expert's first sorted slot
    position = torch.arange(R, device=x.device)
    dest = starts[expert_sorted] + position - first[expert_sorted]     # padded row of each sorted slot
    src = torch.full((rows_max,), T, dtype=torch.long, device=x.device)  # T: the appended zero row
    src[dest] = order // k
    rows = torch.cat([x, x.new_zeros(1, H)]).index_select(0, src)
    expert_of_row = torch.repeat_interleave(torch.arange(N, device=x.device), ends - starts, output_size=rows_max)
    slot_row = torch.empty_like(order)
    slot_row[order] = dest
    return rows, ends.to(torch.int32), expert_of_row, slot_row


def grouped_forward(g, x, k, kind, gmm, align=1):
    T, H = x.shape
    N = g["router"].shape[0]
    top_experts, weights = route(g, x, k)
    flat = top_experts.reshape(-1)                                     # slot t*k + j -> its expert
    if align > 1:
        rows, offs, expert_of_row, slot_row = dispatch_padded(x, flat, k, N, align)
    else:
        rows, offs, expert_of_row, slot_row = dispatch_sorted(x, flat, k, N)
    # grouped_mm(a, b): a [R, K] @ b[g] [K, out] per group; b = the [N, out, K] weights transposed.
    if kind == "gelu":
        h = gmm(rows, g["fc_w"].transpose(-2, -1), offs=offs) + g["fc_b"].index_select(0, expert_of_row)
        h = F.gelu(h, approximate="tanh")
        out = gmm(h, g["proj_w"].transpose(-2, -1), offs=offs) + g["proj_b"].index_select(0, expert_of_row)
    else:
        gate, up = gmm(rows, g["gate_up_w"].transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        out = gmm(F.silu(gate) * up, g["down_w"].transpose(-2, -1), offs=offs)
    out = out.index_select(0, slot_row).view(T, k, H)                  # back to slot order
    return (out * weights.unsqueeze(-1)).sum(dim=1)


# ---- (iii) transformers' MixtralSparseMoeBlock ------------------------------------------------

def hf_mixtral(H, Fd, N, k, T, kind, device, dtype, iterations):
    result = {"note": "MixtralSparseMoeBlock: SwiGLU experts, no biases"
              + (" (NOT GPT-2's GELU MLP: same H, F, N, k)" if kind == "gelu" else "")}
    try:
        import transformers
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        result["transformers"] = transformers.__version__
        config = MixtralConfig(hidden_size=H, intermediate_size=Fd, num_local_experts=N, num_experts_per_tok=k)
        for attr in ("_experts_implementation", "experts_implementation"):
            if hasattr(config, attr):
                result["experts_implementation"] = str(getattr(config, attr))
        # Made on the GPU: the Mixtral shape's experts are 1.4 billion values, minutes of CPU init in fp32.
        with torch.device(device):
            block = MixtralSparseMoeBlock(config).to(dtype=dtype).eval()
        with torch.no_grad():  # defined values whatever the block's own init does
            for name, p in block.named_parameters():
                std = H ** -0.5 if name.startswith("gate") else 0.02
                p.normal_(0.0, std)
        x = torch.randn(1, T, H, device=device, dtype=dtype)

        def forward():
            with torch.no_grad():
                block(x)  # a tuple (hidden, router_logits) in transformers 4.x

        record(result, "forward", forward, device, iterations)
        del block
    except Exception as e:
        result["forward_ms"] = None
        result["forward_error"] = error_text(e)
    return result


# ---- (iv) the dense floor ------------------------------------------------------------------------

def floor_mm(H, Fd, N, k, T, kind, device, dtype, iterations):
    R, F_in = T * k, (2 * Fd if kind == "swiglu" else Fd)
    x = torch.randn(R, H, device=device, dtype=dtype)
    w1 = torch.randn(F_in, H, device=device, dtype=dtype) * 0.02
    w2 = torch.randn(H, Fd, device=device, dtype=dtype) * 0.02
    first = torch.empty(R, F_in, device=device, dtype=dtype)
    # SwiGLU's second GEMM reads the [R, F] silu(gate) * up, a separate matrix.
    second_in = torch.randn(R, Fd, device=device, dtype=dtype) if kind == "swiglu" else first
    y = torch.empty(R, H, device=device, dtype=dtype)

    def floor():
        torch.mm(x, w1.t(), out=first)
        torch.mm(second_in, w2.t(), out=y)

    result = {}
    record(result, "forward", floor, device, iterations, batch=FLOOR_BATCH)
    return result


# ---- one shape -----------------------------------------------------------------------------------

def bench_shape(name, H, Fd, N, k, T, kind, device, dtype, iterations, out, save):
    """Fills `out` (this shape's dict) step by step, calling save() after each step: a failure
    that ends the process (a device-side assert, say) keeps what was measured before it."""
    print(f"torch_moe_cuda: {name}", file=sys.stderr, flush=True)
    out.update({"H": H, "F": Fd, "N": N, "k": k, "T": T, "experts": "gelu-mlp" if kind == "gelu" else "swiglu",
                "forward_flops": (6.0 if kind == "swiglu" else 4.0) * T * k * H * Fd})
    torch.manual_seed(0)
    x = torch.randn(T, H, device=device, dtype=dtype)
    dy = torch.randn(T, H, device=device, dtype=dtype) / T
    x_grad = x.clone().requires_grad_(True)

    w = make_loop_weights(H, Fd, N, kind, device, dtype)
    g = stacked_weights(w, kind)
    requires_grad(w)
    requires_grad(g)

    # The check: both paths (and the padded dispatch) on the same weights and tokens.
    grouped = out["grouped_mm"] = {"forward_backward_dispatch": f"groups padded to multiples of {GROUP_ALIGN} rows"}
    try:
        gmm = grouped_mm_function(device)
        with torch.no_grad():
            a = loop_forward(w, x[:CHECK_TOKENS], k, kind).float()
            b = grouped_forward(g, x[:CHECK_TOKENS], k, kind, gmm).float()
            c = grouped_forward(g, x[:CHECK_TOKENS], k, kind, gmm, align=GROUP_ALIGN).float()
        grouped["check_rel_diff_vs_loop"] = ((a - b).norm() / a.norm()).item()
        grouped["check_padded_rel_diff_vs_loop"] = ((a - c).norm() / a.norm()).item()
    except Exception as e:
        gmm = None
        grouped["check_error"] = error_text(e)
    save()

    loop = out["loop"] = {}
    record(loop, "forward", lambda: _no_grad(loop_forward, w, x, k, kind), device, iterations)
    record(loop, "forward_grad", lambda: loop_forward(w, x, k, kind), device, iterations)
    record(loop, "forward_backward", lambda: loop_forward(w, x_grad, k, kind).backward(dy), device, iterations,
           setup=lambda: (clear_grads(w), setattr(x_grad, "grad", None)))
    clear_grads(w)
    del w
    save()

    if gmm is not None:
        record(grouped, "forward", lambda: _no_grad(grouped_forward, g, x, k, kind, gmm), device, iterations)
        record(grouped, "forward_grad", lambda: grouped_forward(g, x, k, kind, gmm), device, iterations)
    else:
        grouped["forward_ms"] = grouped["forward_grad_ms"] = None
    save()

    out["hf_mixtral"] = hf_mixtral(H, Fd, N, k, T, kind, device, dtype, iterations)
    empty_cache(device)
    save()
    out["floor_mm"] = floor_mm(H, Fd, N, k, T, kind, device, dtype, iterations)
    empty_cache(device)
    save()

    # Last: grouped_mm's backward is the newest code path here.
    grouped["forward_backward_ms"] = None
    if gmm is not None:
        record(grouped, "forward_backward",
               lambda: grouped_forward(g, x_grad, k, kind, gmm, align=GROUP_ALIGN).backward(dy), device, iterations,
               setup=lambda: (clear_grads(g), setattr(x_grad, "grad", None)))
    clear_grads(g)
    del g
    empty_cache(device)
    save()


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def empty_cache(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the JSON to this file (default: stdout)")
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per figure (default 20)")
    parser.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the script only)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes instead of the benchmark's")
    args = parser.parse_args()
    if torch is None:
        sys.exit("torch_moe_cuda: PyTorch is not installed for this python")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_moe_cuda: no CUDA device (use --device cpu --smoke to check the script)")
    # bf16 as the benchmark; the CPU check runs in fp32 (bf16 matmuls on old CPU builds are slow or missing).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        wanted = set(args.shapes.split(","))
        shapes = [s for s in shapes if s[0] in wanted]

    report = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "python": platform.python_version(),
        "iterations": args.iterations,
        "floor_batch": FLOOR_BATCH,
        "shapes": {},
    }

    def save():  # the whole report so far (to stdout only once, at the end)
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(report, indent=2) + "\n")

    for name, H, Fd, N, k, T, kind in shapes:
        report["shapes"][name] = {}
        bench_shape(name, H, Fd, N, k, T, kind, device, dtype, args.iterations, report["shapes"][name], save)
    save()
    if not args.out:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
