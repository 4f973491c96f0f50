#!/usr/bin/python3
"""PyTorch parity test for the ViT MoE example's model (examples/vit_moe/model.hpp).

Runs the dump program (tests/torch_parity/vit_dump.cpp) into a temporary folder, then rebuilds
each dumped model in PyTorch, in float64, the way timm's VisionTransformer computes it, from the
dumped parameters (timm's names and layouts: the patch embedding is a Conv2d with stride P, the
qkv columns split as timm's reshape(B, T, 3, heads, hs)):

    patch_embed (F.conv2d) -> [class token ; patches] + pos_embed -> blocks -> norm -> head

a block being x + proj(attention(qkv(norm1(x)))) then + MLP(norm2(.)), the MLP of an MoE block a
top-k MoE of GELU experts (softmax over the k selected router logits, the paper's eq. 2). The
GELU is the tanh approximation on both sides (moe::GeluMLP's). The Random gate's logits are
taken from the dump; every other gate's router logits are recomputed and compared.

Compared by relative error max|a - b| / max|b| (b = the float64 reference): the logits, the
per-image losses, the mean loss and the gradient of every parameter, for every variant. The
C++ side is fp32 end to end through 4 blocks, so the bound is 1e-4 (seen: ~1e-6).

Usage: vit_parity.py DUMP_EXE [--keep DIR] [--tolerance TOL]
Exit codes: 0 all passed, 1 a comparison or check failed, 77 skipped (no torch / numpy).
"""

import argparse
import math
import os
import sys

SKIP = 77

try:
    import numpy as np  # noqa: F401  (checked here: manifest_reader needs it)
    import torch
    import torch.nn.functional as F
except ImportError as error:  # pragma: no cover - depends on the machine
    print(f"torch_parity_vit SKIPPED: {sys.executable} cannot import torch/numpy ({error})")
    sys.exit(SKIP)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from manifest_reader import Report, read_dump, run_dump  # noqa: E402  (needs numpy)

DTYPE = torch.float64


# ---- the reference model, timm's VisionTransformer --------------------------------------------

def is_moe_block(case, block):
    every = case.opt("moe_every")
    return case.options["variant"] != "dense" and block % every == every - 1


def expected_names(case):
    """timm's parameter names, in its order, with the MoE blocks' library names."""
    gate = case.options["variant"]
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for block in range(case.opt("layers")):
        p = f"blocks.{block}."
        names += [p + n for n in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                                  "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias")]
        if is_moe_block(case, block):
            router = ["moe.router.weight"] if gate in ("linear", "fixed-random") else []
            names += [p + n for n in router + ["moe.experts.fc.weight", "moe.experts.fc.bias",
                                               "moe.experts.proj.weight", "moe.experts.proj.bias"]]
        else:
            names += [p + n for n in ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    return names + ["norm.weight", "norm.bias", "head.weight", "head.bias"]


def moe_ffn(case, P, prefix, x, dumped_logits):
    """x: [R, H] -> [R, H]: top-k routing, softmax over the selected logits, GELU experts."""
    gate, H, N, k = case.options["variant"], case.opt("hidden"), case.opt("experts"), case.opt("top_k")
    if gate == "self":
        logits = x[:, H - N:]  # the paper's x[..., -N:]
    elif gate in ("linear", "fixed-random"):
        logits = F.linear(x, P[prefix + "router.weight"])
    else:  # random: the layer's own draws
        logits = torch.tensor(dumped_logits, dtype=DTYPE)
    top_values, top_index = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    weights = torch.softmax(top_values, dim=-1)
    y = torch.zeros_like(x)
    for e in range(N):
        token, choice = (top_index == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        hidden = F.gelu(F.linear(x[token], P[prefix + "experts.fc.weight"][e], P[prefix + "experts.fc.bias"][e]),
                        approximate="tanh")
        out = F.linear(hidden, P[prefix + "experts.proj.weight"][e], P[prefix + "experts.proj.bias"][e])
        y = y.index_add(0, token, weights[token, choice].unsqueeze(-1) * out)
    ordered = torch.sort(logits.detach(), dim=-1, descending=True).values
    gap = float((ordered[:, k - 1] - ordered[:, k]).min()) if k < N else math.inf
    return y, logits.detach().numpy(), gap


def reference(case):
    """Returns the float64 reference: logits, losses, loss, parameter gradients, router logits, gaps."""
    B, C, S, patch = case.opt("batch"), case.opt("channels"), case.opt("image_size"), case.opt("patch")
    H, heads = case.opt("hidden"), case.opt("heads")
    hs = H // heads
    t = case.tensors
    P = {name: torch.tensor(t[name], dtype=DTYPE, requires_grad=flags["trainable"])
         for name, flags in case.params.items()}
    images = torch.tensor(t["images"], dtype=DTYPE)
    labels = torch.tensor(t["labels"], dtype=DTYPE)
    if not torch.equal(labels, labels.round()):
        raise RuntimeError("non-integer labels in the dump")
    labels = labels.long()

    patches = F.conv2d(images, P["patch_embed.proj.weight"], P["patch_embed.proj.bias"], stride=patch)
    patches = patches.flatten(2).transpose(1, 2)                      # [B, Np, H]
    x = torch.cat([P["cls_token"].expand(B, -1, -1), patches], dim=1) + P["pos_embed"]
    T = x.shape[1]
    router_logits, gaps = {}, []
    for block in range(case.opt("layers")):
        p = f"blocks.{block}."
        y = F.layer_norm(x, (H,), P[p + "norm1.weight"], P[p + "norm1.bias"], eps=1e-5)
        qkv = F.linear(y, P[p + "attn.qkv.weight"], P[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, T, 3, heads, hs).permute(2, 0, 3, 1, 4)  # timm's Attention
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hs), dim=-1)  # no mask: bidirectional
        x = x + F.linear((att @ v).transpose(1, 2).reshape(B, T, H), P[p + "attn.proj.weight"], P[p + "attn.proj.bias"])
        y = F.layer_norm(x, (H,), P[p + "norm2.weight"], P[p + "norm2.bias"], eps=1e-5)
        if is_moe_block(case, block):
            key = p + "moe.router_logits"
            out, logits, gap = moe_ffn(case, P, p + "moe.", y.reshape(B * T, H), t.get(key))
            router_logits[key] = logits
            gaps.append(gap)
            x = x + out.reshape(B, T, H)
        else:
            hidden = F.gelu(F.linear(y, P[p + "mlp.fc1.weight"], P[p + "mlp.fc1.bias"]), approximate="tanh")
            x = x + F.linear(hidden, P[p + "mlp.fc2.weight"], P[p + "mlp.fc2.bias"])
    x = F.layer_norm(x, (H,), P["norm.weight"], P["norm.bias"], eps=1e-5)
    logits = F.linear(x[:, 0], P["head.weight"], P["head.bias"])   # the class token
    losses = F.cross_entropy(logits, labels, reduction="none")
    loss = losses.mean()
    loss.backward()
    return {
        "logits": logits.detach().numpy(),
        "losses": losses.detach().numpy(),
        "loss": float(loss),
        "grads": {name: p.grad.numpy() for name, p in P.items() if p.grad is not None},
        "router_logits": router_logits,
        "gap": min(gaps) if gaps else math.inf,
    }


def check_case(case, report):
    name, gate = case.name, case.options["variant"]
    H, N = case.opt("hidden"), case.opt("experts")
    moe_blocks = [b for b in range(case.opt("layers")) if is_moe_block(case, b)]

    report.check(name, "parameter names (timm order)", list(case.params) == expected_names(case),
                 f"{len(case.params)} tensors")
    for param, flags in case.params.items():
        if param.endswith("router.weight") and gate == "fixed-random":
            frozen = not flags["trainable"] and not flags["grad"] and param + ".grad" not in case.tensors
            report.check(name, f"{param} frozen", frozen, f"{flags}")
        elif not (flags["trainable"] and flags["grad"]):
            report.check(name, f"{param} trainable with grad", False, f"{flags}")
    router_params = int(case.scalars["router_parameters"])
    expected_router = len(moe_blocks) * N * H if gate == "linear" else 0
    report.check(name, "router parameter count", router_params == expected_router, f"{router_params}")

    ref = reference(case)
    if moe_blocks:
        report.check(name, "top-k selection well separated", ref["gap"] > 1e-5, f"min logit gap {ref['gap']:.3e}")
        for key, logits in ref["router_logits"].items():
            if gate != "random":
                report.compare(name, key, case.tensors[key], logits)
    report.compare(name, "logits", case.tensors["logits"], ref["logits"])
    report.compare(name, "losses", case.tensors["losses"], ref["losses"])
    report.compare(name, "loss", float(case.scalars["loss"]), ref["loss"])
    report.check(name, "loss away from log(classes)", abs(ref["loss"] - math.log(case.opt("classes"))) > 0.05,
                 f"{ref['loss']:.4f}")
    compared = 0
    for param, flags in case.params.items():
        if flags["grad"]:
            report.compare(name, f"grad {param}", case.tensors[param + ".grad"], ref["grads"][param])
            compared += 1
    report.check(name, "every trainable tensor compared", compared == len(ref["grads"]), f"{compared}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump_exe", help="the moe_torch_parity_vit_dump program")
    parser.add_argument("--keep", metavar="DIR", help="dump into DIR and keep it (default: a temporary folder)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="relative error bound (default 1e-4)")
    args = parser.parse_args()

    torch.set_num_threads(2)
    return run_dump(args.dump_exe, args.keep, "moe_torch_parity_vit_", lambda folder: check_dump(folder, args.tolerance))


def check_dump(folder, tolerance):
    cases = read_dump(folder, cast=int)
    print(f"torch {torch.__version__}, reference in float64, tolerance {tolerance:g}")
    report = Report(tolerance, case_width=18, what_width=40)
    variants = sorted(case.options["variant"] for case in cases)
    report.check("-", "every variant dumped", variants == sorted(["dense", "linear", "self", "fixed-random", "random"]),
                 f"{variants}")
    for case in cases:
        check_case(case, report)

    if report.failures:
        print(f"torch_parity_vit: {report.failures} check(s) FAILED over {len(cases)} cases")
        return 1
    print(f"torch_parity_vit: all checks passed over {len(cases)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
