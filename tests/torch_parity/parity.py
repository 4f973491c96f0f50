#!/usr/bin/python3
"""PyTorch parity test for the moe layers (registered with ctest as `torch_parity`).

Runs the dump program (tests/torch_parity/dump.cpp) into a temporary folder, then rebuilds each
dumped layer in PyTorch, in float64, straight from the documented semantics (moe/routing.hpp,
moe/aux_loss.hpp, moe/experts.hpp), and compares the C++ fp32 results with it:

    y, dx, every parameter gradient, the logits and the auxiliary losses,

by relative error max|a - b| / max|b| (b = the float64 PyTorch reference).

Given the nn dump program (tests/torch_parity/nn_dump.cpp, ctest `torch_parity_nn`) it checks the
building blocks of moe/nn.hpp the same way, each against PyTorch's own op with autograd:
layernorm (F.layer_norm), linear (F.linear), the GPT-2 embedding (F.embedding), attention (written
out: softmax(q k^T / sqrt(hs), causal mask) v), cross-entropy (F.cross_entropy, ignore_index=-1)
and AdamW (torch.optim.AdamW, two steps). The cases say which program wrote them: an nn case has
a kind=... option.

Usage: parity.py DUMP_EXE [--keep DIR] [--tolerance TOL]
Exit codes: 0 all passed, 1 a comparison or check failed, 77 skipped (no torch / numpy).
"""

import argparse
import math
import os
import sys

SKIP = 77

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
except ImportError as error:  # pragma: no cover - depends on the machine
    print(f"torch_parity SKIPPED: {sys.executable} cannot import torch/numpy ({error})")
    sys.exit(SKIP)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from manifest_reader import Report, read_dump, run_dump  # noqa: E402  (needs numpy)

DTYPE = torch.float64


# ---- the reference layer, from the semantics ------------------------------------------------

EXPECTED_PARAMS = {
    "gelu-mlp": ["experts.fc.weight", "experts.fc.bias", "experts.proj.weight", "experts.proj.bias"],
    "swiglu": ["experts.gate_up.weight", "experts.down.weight"],
}


def expert_output(kind, p, e, rows, ffn):
    """Expert e applied to rows [R, H] (weights in nn.Linear convention, stacked over experts)."""
    if kind == "gelu-mlp":
        hidden = F.gelu(F.linear(rows, p["experts.fc.weight"][e], p["experts.fc.bias"][e]), approximate="tanh")
        return F.linear(hidden, p["experts.proj.weight"][e], p["experts.proj.bias"][e])
    if kind == "swiglu":
        gate_up = F.linear(rows, p["experts.gate_up.weight"][e])
        gate, up = gate_up[:, :ffn], gate_up[:, ffn:]
        return F.linear(F.silu(gate) * up, p["experts.down.weight"][e])
    raise ValueError(f"unknown expert {kind!r}")


def reference(case):
    """Returns the float64 reference: y, dx, parameter gradients, logits, aux losses, routing facts."""
    H, N, k, T = (case.opt(key, int) for key in ("hidden", "experts", "top_k", "tokens"))
    ffn = case.opt("ffn", int)
    gate, expert, mode = case.opt("gate"), case.opt("expert"), case.opt("weights")
    capacity_factor = case.opt("capacity", float)
    alpha, beta = case.opt("load_balance", float), case.opt("z_loss", float)
    t = case.tensors

    x = torch.tensor(t["x"], dtype=DTYPE, requires_grad=True)
    dy = torch.tensor(t["dy"], dtype=DTYPE)
    params = {}
    for name, flags in case.params.items():
        params[name] = torch.tensor(t[name], dtype=DTYPE, requires_grad=flags["trainable"])

    # Gate: the routing logits z [T, N].
    if gate == "self":
        logits = x[:, H - N:]  # the paper's x[..., -N:]
    elif gate in ("linear", "fixed-random"):
        logits = F.linear(x, params["router.weight"])
    elif gate == "random":
        logits = torch.tensor(t["logits"], dtype=DTYPE)  # not reproducible here: use the layer's
    else:
        raise ValueError(f"unknown gate {gate!r}")

    # Selection and weights.
    top_values, top_index = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    if mode == "softmax_over_top_k":
        weights = torch.softmax(top_values, dim=-1)  # paper eq. 2
    elif mode == "softmax_then_top_k":
        weights = torch.softmax(logits, dim=-1).gather(-1, top_index)  # not renormalised
    else:
        raise ValueError(f"unknown weights {mode!r}")

    # Capacity: first choices in token order, then second choices, ... until an expert is full.
    slots = T * k
    capacity = slots if capacity_factor <= 0 else min(slots, math.ceil(capacity_factor * slots / N))
    chosen = top_index.tolist()
    kept = torch.zeros(T, k, dtype=torch.bool)
    filled = [0] * N
    for j in range(k):
        for token in range(T):
            e = chosen[token][j]
            if filled[e] < capacity:
                filled[e] += 1
                kept[token, j] = True
    dropped = int((~kept).sum())

    # Experts and the weighted combination y_t = sum_j w_tj E_{e_tj}(x_t).
    y = torch.zeros(T, H, dtype=DTYPE)
    for e in range(N):
        token, choice = ((top_index == e) & kept).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        out = expert_output(expert, params, e, x[token], ffn)
        y = y.index_add(0, token, weights[token, choice].unsqueeze(-1) * out)

    # Auxiliary losses.
    load_balance = torch.zeros((), dtype=DTYPE)
    z_loss = torch.zeros((), dtype=DTYPE)
    if alpha > 0:
        f = torch.bincount(top_index.reshape(-1), minlength=N).to(DTYPE) / slots  # no gradient
        P = torch.softmax(logits, dim=-1).mean(dim=0)
        load_balance = alpha * N * (f * P).sum()
    if beta > 0:
        z_loss = beta * (torch.logsumexp(logits, dim=-1) ** 2).mean()

    loss = (y * dy).sum() + load_balance + z_loss
    loss.backward()

    # Smallest gap between the k-th and (k+1)-th logit: selection is ill-posed if it is ~0.
    ordered = torch.sort(logits.detach(), dim=-1, descending=True).values
    gap = float((ordered[:, k - 1] - ordered[:, k]).min()) if k < N else math.inf

    return {
        "y": y.detach().numpy(),
        "dx": x.grad.numpy(),
        "logits": logits.detach().numpy(),
        "grads": {name: p.grad.numpy() for name, p in params.items() if p.grad is not None},
        "load_balance": float(load_balance),
        "z_loss": float(z_loss),
        "dropped": dropped,
        "capacity": capacity,
        "gap": gap,
    }


def check_case(case, report):
    name = case.name
    gate, expert = case.opt("gate"), case.opt("expert")
    H, N = case.opt("hidden", int), case.opt("experts", int)

    # The parameter list: the gate's (if any) then the experts', with the right flags.
    expected = (["router.weight"] if gate in ("linear", "fixed-random") else []) + EXPECTED_PARAMS[expert]
    report.check(name, "parameter names", list(case.params) == expected, f"{list(case.params)}")
    for param, flags in case.params.items():
        if param == "router.weight" and gate == "fixed-random":
            frozen = not flags["trainable"] and not flags["grad"] and param + ".grad" not in case.tensors
            report.check(name, "router.weight frozen, no grad", frozen, f"{flags}")
        else:
            report.check(name, f"{param} trainable with grad", flags["trainable"] and flags["grad"], f"{flags}")
    router_params = int(case.scalars["router_parameters"])
    report.check(name, "router parameter count", router_params == (N * H if gate == "linear" else 0),
                 f"{router_params}")

    ref = reference(case)
    report.check(name, "top-k selection well separated", ref["gap"] > 1e-5, f"min logit gap {ref['gap']:.3e}")

    if gate != "random":
        report.compare(name, "logits", case.tensors["logits"], ref["logits"])
    report.compare(name, "y", case.tensors["y"], ref["y"])
    report.compare(name, "dx", case.tensors["dx"], ref["dx"])
    for param, flags in case.params.items():
        if flags["grad"]:
            report.compare(name, f"grad {param}", case.tensors[param + ".grad"], ref["grads"][param])

    # Auxiliary losses: exactly 0 when off.
    for key, weight in (("load_balance", "load_balance"), ("z_loss", "z_loss")):
        ours = float(case.scalars[key])
        if case.opt(weight, float) > 0:
            report.compare(name, f"aux {key}", ours, ref[key])
        else:
            report.check(name, f"aux {key} off", ours == 0.0, f"{ours}")
    if case.opt("load_balance", float) > 0 or case.opt("z_loss", float) > 0:
        report.compare(name, "aux_loss (total)", float(case.scalars["aux_loss"]),
                       ref["load_balance"] + ref["z_loss"])

    # Capacity and drops.
    capacity, dropped = int(case.scalars["capacity"]), int(case.scalars["dropped_slots"])
    report.check(name, "capacity", capacity == ref["capacity"], f"{capacity} (reference {ref['capacity']})")
    report.check(name, "dropped slots", dropped == ref["dropped"], f"{dropped} (reference {ref['dropped']})")
    if case.opt("capacity", float) > 0:
        report.check(name, "capacity case drops something", ref["dropped"] > 0, f"{ref['dropped']} dropped")


# ---- the nn building blocks (nn_dump.cpp) ---------------------------------------------------

def _t(array, grad=False):
    return torch.tensor(array, dtype=DTYPE, requires_grad=grad)


def _ids(array):
    ids = torch.tensor(array, dtype=DTYPE)
    if not torch.equal(ids, ids.round()):
        raise RuntimeError("non-integer ids in the dump")
    return ids.long()


# AdamW after a step: the parameters themselves are held to the usual tolerance (they match to
# ~5e-8 relative), which says little alone, since an update is only ~lr = 0.05 of them. So the
# update p_t - p_0 is checked too, relative to its own size. The C++ side is fp32 throughout:
# each rounding of a value |p| <= ~1.5 (the decay, the step, the dump) costs up to ~9e-8, i.e.
# ~2e-6 of an update of ~0.05, and a few of those accumulate over two steps (seen: 1.5e-6), so
# 1e-5 would be marginal; 1e-4 keeps a margin and is still ~700x below what applying the weight
# decay to the bias as well (the bug this is meant to catch) gives (7e-2).
ADAMW_UPDATE_TOLERANCE = 1e-4


def check_nn_case(case, report):
    name, kind, t = case.name, case.opt("kind"), case.tensors

    def accumulated(what, ref_grad):
        """A gradient added (+=) into a buffer that held what.prior."""
        report.compare(name, what, t[what], t[what + ".prior"] + ref_grad.detach().numpy())

    if kind == "layernorm":
        C = case.opt("cols", int)
        x, w, b = _t(t["x"], True), _t(t["weight"], True), _t(t["bias"], True)
        out = F.layer_norm(x, (C,), w, b, eps=1e-5)
        (out * _t(t["dout"])).sum().backward()
        report.compare(name, "out", t["out"], out.detach().numpy())
        xd = x.detach()
        report.compare(name, "mean (cached)", t["mean"], xd.mean(dim=-1).numpy())
        report.compare(name, "rstd (cached)", t["rstd"],
                       (1 / torch.sqrt(xd.var(dim=-1, unbiased=False) + 1e-5)).numpy())
        accumulated("dx", x.grad)
        accumulated("dweight", w.grad)
        accumulated("dbias", b.grad)

    elif kind == "linear":
        x, w, b = _t(t["in"], True), _t(t["weight"], True), _t(t["bias"], True)
        out = F.linear(x, w, b)
        (out * _t(t["dout"])).sum().backward()
        report.compare(name, "out", t["out"], out.detach().numpy())
        accumulated("din", x.grad)
        accumulated("dweight", w.grad)
        accumulated("dbias", b.grad)

    elif kind == "embedding":
        B, T = case.opt("batch", int), case.opt("seq", int)
        tokens = _ids(t["tokens"])
        wte, wpe = _t(t["wte"], True), _t(t["wpe"], True)
        positions = torch.arange(B * T) % T
        out = F.embedding(tokens, wte) + F.embedding(positions, wpe)
        (out * _t(t["dout"])).sum().backward()
        counts = torch.bincount(tokens, minlength=wte.shape[0])
        report.check(name, "ids repeat, some rows unused", int(counts.max()) > 1 and int((counts == 0).sum()) > 0,
                     f"max count {int(counts.max())}, unused {int((counts == 0).sum())}")
        report.compare(name, "out", t["out"], out.detach().numpy())
        accumulated("dwte", wte.grad)
        accumulated("dwpe", wpe.grad)
        untouched = np.array_equal(t["dwpe"][T:], t["dwpe.prior"][T:]) and np.array_equal(
            t["dwte"][counts.numpy() == 0], t["dwte.prior"][counts.numpy() == 0])
        report.check(name, "rows with no gradient untouched", untouched, "dwpe rows >= T, dwte unused ids")

    elif kind == "attention":
        B, T = case.opt("batch", int), case.opt("seq", int)
        heads, hs, causal = case.opt("heads", int), case.opt("head_size", int), case.opt("causal") == "1"
        C = heads * hs
        qkv = _t(t["qkv"], True)

        def split(part):  # [B*T, C] columns of part -> [B, heads, T, hs]
            return qkv[:, part * C:(part + 1) * C].reshape(B, T, heads, hs).transpose(1, 2)

        q, k, v = split(0), split(1), split(2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hs)
        if causal:
            mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
            scores = scores.masked_fill(mask, -math.inf)
        att = torch.softmax(scores, dim=-1)
        out = (att @ v).transpose(1, 2).reshape(B * T, C)
        (out * _t(t["dout"])).sum().backward()
        report.compare(name, "out", t["out"], out.detach().numpy())
        report.compare(name, "att (probabilities)", t["att"], att.detach().numpy())
        if causal:
            above = np.triu(np.ones((T, T), dtype=bool), k=1)
            masked = t["att"][..., above]
            report.check(name, "masked att exactly 0", bool(np.all(masked == 0)),
                         f"max |masked| {float(np.max(np.abs(masked))) if masked.size else 0.0:g}")
        accumulated("dqkv", qkv.grad)

    elif kind == "cross_entropy":
        dloss = float(case.scalars["dloss"])
        targets = _ids(t["targets"])
        ignored = (targets == -1).numpy()
        report.check(name, "some rows ignored", 0 < int(ignored.sum()) < len(ignored),
                     f"{int(ignored.sum())} of {len(ignored)}")
        logits = _t(t["logits"], True)
        loss = F.cross_entropy(logits, targets, ignore_index=-1, reduction="mean")
        (dloss * loss).backward()
        losses = F.cross_entropy(logits.detach(), targets, ignore_index=-1, reduction="none")
        report.compare(name, "mean loss", float(case.scalars["loss"]), float(loss))
        report.compare(name, "per-row losses", t["losses"], losses.numpy())
        report.compare(name, "dlogits (written)", t["dlogits"], logits.grad.numpy())
        report.compare(name, "dlogits (in place)", t["dlogits.in_place"], logits.grad.numpy())
        report.check(name, "ignored rows exactly 0", bool(np.all(t["dlogits"][ignored] == 0))
                     and bool(np.all(t["losses"][ignored] == 0)), "dlogits and losses")

    elif kind == "adamw":
        sc = {key: float(case.scalars[key]) for key in ("lr", "lr2", "beta1", "beta2", "eps", "weight_decay")}
        w, b = _t(t["weight.0"]), _t(t["bias.0"])
        w.requires_grad_(True)
        b.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            [{"params": [w], "weight_decay": sc["weight_decay"]}, {"params": [b], "weight_decay": 0.0}],
            lr=sc["lr"], betas=(sc["beta1"], sc["beta2"]), eps=sc["eps"])
        for step, lr in ((1, sc["lr"]), (2, sc["lr2"])):
            for group in optimizer.param_groups:
                group["lr"] = lr
            w.grad, b.grad = _t(t[f"weight.grad.{step}"]), _t(t[f"bias.grad.{step}"])
            optimizer.step()
            for param, ref in (("weight", w), ("bias", b)):
                ref = ref.detach().numpy()
                report.compare(name, f"{param} after step {step}", t[f"{param}.{step}"], ref)
                report.compare(name, f"{param} update to step {step}", t[f"{param}.{step}"] - t[f"{param}.0"],
                               ref - t[f"{param}.0"], tolerance=ADAMW_UPDATE_TOLERANCE)

    else:
        report.check(name, "known kind", False, kind)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump_exe", help="the moe_torch_parity_dump program")
    parser.add_argument("--keep", metavar="DIR", help="dump into DIR and keep it (default: a temporary folder)")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="relative error bound (default 1e-5)")
    args = parser.parse_args()

    torch.set_num_threads(2)
    return run_dump(args.dump_exe, args.keep, "moe_torch_parity_", lambda folder: check_dump(folder, args.tolerance))


def check_dump(folder, tolerance):
    cases = read_dump(folder)
    print(f"torch {torch.__version__}, reference in float64, tolerance {tolerance:g}")
    report = Report(tolerance)
    if not cases:
        report.check("-", "cases dumped", False, "none")
    for case in cases:
        if "kind" in case.options:
            check_nn_case(case, report)
        else:
            check_case(case, report)

    label = "torch_parity_nn" if any("kind" in case.options for case in cases) else "torch_parity"
    if report.failures:
        print(f"{label}: {report.failures} check(s) FAILED over {len(cases)} cases")
        return 1
    print(f"{label}: all checks passed over {len(cases)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
