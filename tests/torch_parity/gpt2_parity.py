#!/usr/bin/python3
"""Whole-model PyTorch parity for the GPT-2 MoE example (registered with ctest as `torch_parity_gpt2`).

Runs the dump program (tests/torch_parity/gpt2_dump.cpp): one forward and one backward of a tiny
fp32 gpt2::Model per variant (dense, linear, self, fixed-random, random, and self / linear with the
gate reading the residual stream), each saved as a safetensors file with the parameters, tokens,
targets, loss, logits, routing and every parameter gradient. Then, per file, loads the parameters
into the PyTorch model of gpt2_torch.py (float64, the reference; the Random gate routes with the
dumped logits, which come from the library's counter-based generator) and compares

    the loss, the logits, the chosen experts (exactly), the gate logits, every parameter gradient

by relative error ||ours - ref|| / ||ref|| (2-norm over the tensor), < 1e-4 each. The same
PyTorch model in float32 is measured against the reference too and printed beside ours: what
fp32 rounding alone costs. Controls show that the comparison can fail: the reference with one
weight perturbed, with Switch-style routing weights (softmax over all N, not renormalised), with
SelfRoute reading the first N coordinates instead of the last, and with the Random gate's draws
of the two layers swapped must each miss the C++ results by more than the tolerance.

Safetensors is read with json, struct and numpy (Debian has no safetensors package).

Usage: gpt2_parity.py DUMP_EXE [--keep DIR] [--tolerance TOL] [--verbose]
Exit codes: 0 all passed, 1 a comparison or check failed, 77 skipped (no torch / numpy).
"""

import argparse
import glob
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

SKIP = 77

try:
    import numpy as np
    import torch
except ImportError as error:  # pragma: no cover - depends on the machine
    print(f"torch_parity_gpt2 SKIPPED: {sys.executable} cannot import torch/numpy ({error})")
    sys.exit(SKIP)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt2_torch  # noqa: E402  (after the skip check: it imports torch)

VARIANTS_REQUIRED = set(gpt2_torch.VARIANTS)
# A selection closer than this to a tie could flip between fp32 and float64 logits.
MIN_TOP_K_GAP = 1e-4
# A control must miss by this many tolerances, so that a marginal miss does not count.
CONTROL_MARGIN = 10.0


# ---- safetensors ----------------------------------------------------------------------------

NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1"}


def read_safetensors(path):
    """Returns ({name: numpy array}, {metadata key: value}); raises ValueError naming the problem."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: {len(data)} bytes, shorter than the 8-byte header length")
    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length > len(data) - 8:
        raise ValueError(f"{path}: header length {header_length} runs past the end ({len(data)} bytes)")
    header = json.loads(data[8:8 + header_length].decode("utf-8"))
    body = memoryview(data)[8 + header_length:]
    metadata = header.pop("__metadata__", {})
    tensors, covered = {}, 0
    for name, entry in header.items():
        dtype = NUMPY_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if not 0 <= begin <= end <= len(body) or end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
            raise ValueError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] do not fit shape {shape}")
        tensors[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
        covered += end - begin
    if covered != len(body):
        raise ValueError(f"{path}: tensors cover {covered} of the {len(body)} data bytes")
    return tensors, metadata


# ---- the reference --------------------------------------------------------------------------

class Dump:
    def __init__(self, path):
        self.path = path
        self.tensors, self.meta = read_safetensors(path)
        self.name, self.variant = self.meta["case"], self.meta["variant"]
        fields = ("vocab", "context", "layers", "heads", "hidden", "ffn", "experts", "top_k")
        self.config = gpt2_torch.Config(**{key: int(self.meta[key]) for key in fields},
                                        route_from_residual=self.meta["route_from_residual"] == "1",
                                        self_slice=self.meta.get("self_slice", "last"))
        self.params = {key[len("param."):]: value for key, value in self.tensors.items() if key.startswith("param.")}
        self.grads = {key[len("grad."):]: value for key, value in self.tensors.items() if key.startswith("grad.")}
        self.frozen = [name for name in self.meta["frozen"].split(",") if name]

    def routing(self, layer, what):
        return self.tensors[f"routing.h.{layer}.{what}"]


def run_reference(dump, dtype, perturb=None, swap_random=False, **moe_options):
    """The PyTorch model with the dump's parameters (and, for the Random gate, its draws):
    returns loss, logits, gradients, and per MoE layer the gate logits and chosen experts.
    perturb = (name, flat index, delta) changes one parameter; swap_random feeds layer l the
    Random gate's draws of layer L-1-l."""
    model = gpt2_torch.GPT(dump.config, dump.variant, **moe_options).to(dtype)
    params = {name: torch.tensor(value, dtype=dtype) for name, value in dump.params.items()}
    if perturb:
        name, index, delta = perturb
        params[name].view(-1)[index] += delta
    model.load_library_tensors(params)
    moes = model.moe_layers()
    if dump.variant == "random":
        order = reversed(range(len(moes))) if swap_random else range(len(moes))
        for layer, source in zip(moes, order):
            layer.set_random_logits(torch.tensor(dump.routing(source, "logits"), dtype=dtype))
    tokens = torch.tensor(dump.tensors["tokens"], dtype=torch.long)
    targets = torch.tensor(dump.tensors["targets"], dtype=torch.long)
    logits, loss = model(tokens, targets)
    loss.backward()
    return {
        "loss": float(loss),
        "logits": logits.detach().reshape(-1, dump.config.vocab).numpy(),
        "grads": {name: g.detach().numpy() for name, g in model.library_tensors(gradients=True).items()},
        "frozen": [name for name, p in model.named_parameters() if not p.requires_grad],
        "gate_logits": [layer.last_logits.numpy() for layer in moes],
        "choices": [layer.last_choices.numpy() for layer in moes],
    }


def relative_error(ours, ref):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return math.inf
    if not np.all(np.isfinite(ours)):
        return math.inf
    scale = float(np.linalg.norm(ref))
    diff = float(np.linalg.norm(ours - ref))
    return diff / scale if scale > 0 else diff


def worst_mismatch(dump, ref, loss_only=False):
    """The largest relative error of the C++ results against a reference: (error, what)."""
    errors = [(relative_error(float(dump.tensors["loss"]), ref["loss"]), "loss")]
    if loss_only:
        return errors[0]
    errors += [(relative_error(dump.grads[name], ref["grads"][name]), f"grad {name}")
               for name in dump.grads if name in ref["grads"]]
    return max(errors)


# ---- the checks -----------------------------------------------------------------------------

class Report:
    def __init__(self, tolerance, verbose):
        self.tolerance, self.verbose = tolerance, verbose
        self.failures = 0
        self.rows = []

    def check(self, case, what, condition, detail=""):
        self.failures += not condition
        if not condition or self.verbose:
            print(f"{'ok  ' if condition else 'FAIL'} {case:22s} {what:44s} {detail}")
        return condition

    def compare(self, case, what, ours, ref, torch32=None):
        error = relative_error(ours, ref)
        note = f"rel_err {error:.2e}" + ("" if torch32 is None else f"  (torch fp32 {relative_error(torch32, ref):.2e})")
        self.check(case, what, error < self.tolerance, note)
        return error


def check_case(dump, report):
    name, variant, N = dump.name, dump.variant, dump.config.experts
    tol = report.tolerance
    ref = run_reference(dump, torch.float64)
    f32 = run_reference(dump, torch.float32)

    # The parameter list and the frozen router.
    model_names = gpt2_torch.GPT(dump.config, variant).library_names()
    report.check(name, "parameter names and order", list(dump.params) == model_names,
                 f"{len(dump.params)} dumped, {len(model_names)} in the PyTorch model")
    report.check(name, "frozen parameters", dump.frozen == ref["frozen"] and set(dump.grads) == set(ref["grads"]),
                 f"C++ {dump.frozen}, PyTorch {ref['frozen']}")
    if variant == "fixed-random":
        report.check(name, "fixed-random: every router frozen", len(dump.frozen) == dump.config.layers, f"{dump.frozen}")
    report.check(name, "metadata loss = loss tensor", float(dump.meta["loss"]) == float(dump.tensors["loss"]))

    loss_error = report.compare(name, "loss", float(dump.tensors["loss"]), ref["loss"], f32["loss"])
    logits_error = report.compare(name, "logits", dump.tensors["logits"], ref["logits"], f32["logits"])

    # Routing: the same experts exactly, selections well separated, the same gate logits.
    routing_ok = True
    for layer in range(len(ref["choices"])):
        gate_logits = ref["gate_logits"][layer]
        ordered = -np.sort(-gate_logits, axis=1)
        k = dump.config.top_k
        gap = float((ordered[:, k - 1] - ordered[:, k]).min()) if k < N else math.inf
        report.check(name, f"h.{layer}: top-k well separated", gap > MIN_TOP_K_GAP, f"min gap {gap:.2e}")
        same = np.array_equal(dump.routing(layer, "experts"), ref["choices"][layer])
        routing_ok &= same
        report.check(name, f"h.{layer}: chosen experts identical", same)
        if variant != "random":
            report.compare(name, f"h.{layer}: gate logits", dump.routing(layer, "logits"), gate_logits)
        counts = np.bincount(ref["choices"][layer].reshape(-1), minlength=N)
        report.check(name, f"h.{layer}: every expert used", bool(np.all(counts > 0)), f"slots per expert {counts}")

    grad_errors, torch_errors = {}, {}
    for param in dump.grads:
        grad_errors[param] = report.compare(name, f"grad {param}", dump.grads[param], ref["grads"][param],
                                            f32["grads"][param])
        torch_errors[param] = relative_error(f32["grads"][param], ref["grads"][param])

    # Controls: references that are wrong on purpose must miss by far more than the tolerance.
    # (label, the loss alone or everything, the wrong reference's options)
    weight = "h.1.attn.c_attn.weight"  # entries ~0.18
    controls = [(f"{weight}[5] += 0.5: the loss", True, dict(perturb=(weight, 5, 0.5))),
                (f"{weight}[5] += 0.01: a gradient", False, dict(perturb=(weight, 5, 0.01)))]
    if variant != "dense":
        controls.append(("softmax_then_top_k weights", False, dict(weights="softmax_then_top_k")))
    if variant == "self":
        controls.append(("self reads the first N", False, dict(self_offset=0)))
        if dump.config.self_slice == "per-layer":
            last = dump.config.hidden - dump.config.experts
            controls.append(("every layer reads the last N", False, dict(self_offset=last)))
    if variant == "random":
        controls.append(("random draws of the layers swapped", False, dict(swap_random=True)))
    detected = []
    for label, loss_only, options in controls:
        wrong = run_reference(dump, torch.float64, **options)
        error, what = worst_mismatch(dump, wrong, loss_only)
        ok = report.check(name, f"control: {label}", error > CONTROL_MARGIN * tol, f"missed by {error:.2e} ({what})")
        detected.append(ok)

    worst = max(grad_errors, key=grad_errors.get)
    report.rows.append((name, loss_error, logits_error, grad_errors[worst], worst, max(torch_errors.values()),
                        routing_ok, sum(detected), len(detected), len(grad_errors)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump_exe", help="the moe_torch_parity_gpt2_dump program")
    parser.add_argument("--keep", metavar="DIR", help="dump into DIR and keep it (default: a temporary folder)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="relative error bound (default 1e-4)")
    parser.add_argument("--verbose", action="store_true", help="print every check, not only failures")
    args = parser.parse_args()

    torch.set_num_threads(1)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    report = Report(args.tolerance, args.verbose)
    with tempfile.TemporaryDirectory(prefix="moe_torch_parity_gpt2_") as temporary:
        folder = args.keep or temporary
        run = subprocess.run([args.dump_exe, folder], env=env)
        if run.returncode != 0:
            print(f"FAIL the dump program exited with {run.returncode}")
            return 1
        dumps = [Dump(path) for path in sorted(glob.glob(os.path.join(folder, "*.safetensors")))]
    print(f"torch {torch.__version__}; reference: the PyTorch model in float64; tolerance {args.tolerance:g} "
          f"(||ours - ref|| / ||ref||)")
    missing = VARIANTS_REQUIRED - {dump.variant for dump in dumps}
    report.check("-", "every variant dumped", not missing, f"missing {sorted(missing)}" if missing else "")
    for dump in dumps:
        check_case(dump, report)

    print(f"\n{'case':22s} {'grads':>5s} {'loss':>9s} {'logits':>9s} {'worst grad':>10s} {'(tensor)':28s} "
          f"{'torch fp32':>10s} {'routing':>8s} {'controls':>8s}")
    for (name, loss, logits, grad, which, torch32, routing, caught, controls, count) in report.rows:
        print(f"{name:22s} {count:5d} {loss:9.2e} {logits:9.2e} {grad:10.2e} {which:28s} {torch32:10.2e} "
              f"{'same' if routing else 'DIFFER':>8s} {f'{caught}/{controls}':>8s}")
    print("(relative errors against the float64 reference; worst grad: the largest over the case's gradient "
          "tensors; torch fp32: PyTorch's own float32 run, its largest gradient error; controls: wrong references "
          "that missed by more than 10x the tolerance)")

    if report.failures:
        print(f"torch_parity_gpt2: {report.failures} check(s) FAILED over {len(dumps)} cases")
        return 1
    print(f"torch_parity_gpt2: all checks passed over {len(dumps)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
