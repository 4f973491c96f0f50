#!/usr/bin/python3
"""The ViT MoE model of examples/vit_moe/model.hpp, as a PyTorch nn.Module (importable).

The PyTorch peer of the training benchmark (bench/torch_vit_train.py). float32 unless the
caller converts it (`model.double()`). The model, as the C++ one (timm's VisionTransformer):

  patches = the P x P patches of each image, flattened as (c, y, x)      [B, Np, C*P*P]
  x_0     = [cls_token ; patch_embed(patches)] + pos_embed               [B, T, H], T = 1 + Np
  a_l     = x_l + proj(attention(qkv(norm1(x_l))))      bidirectional (no mask), timm's q | k | v
  x_{l+1} = a_l + FFN_l(norm2(a_l))       FFN_l: MoE in blocks moe_every-1, 2*moe_every-1, ...
  logits  = head(norm(x_L[:, 0]))                                        the class token
  loss    = mean cross-entropy
pre-LayerNorm blocks (eps 1e-5), tanh-GELU, nn.Linear layouts ([out, in]). The patch embedding
is an nn.Linear over the flattened patches (the same product as timm's stride-P Conv2d).

The MoE FFN is gpt2_torch.MoE (the library's semantics contract: the top k logits, ties by the
lower expert, softmax over the k selected, dropless combine), in the common eager style: a
Python loop over the experts, fed by index_select and summed back with index_add_. Every token
is routed, the class token included. The gate reads the FFN's own input (norm2's output).

Parameter names are timm's (cls_token, patch_embed.proj.weight, blocks.0.attn.qkv.weight, ...);
MoE blocks hold blocks.{l}.moe.* with the experts as a ModuleList (blocks.1.moe.experts.3.fc.weight
[F, H]). `load_library_tensors()` takes the C++ model's names and layouts (patch_embed.proj.weight
[H, C, P, P], stacked experts blocks.1.moe.experts.fc.weight [N, F, H]).

Run as a script, it checks itself against the C++ model on the same weights (a quick check, not
a ctest; tests/torch_parity/vit_parity.py is the float64 parity test):

  /usr/bin/python3 tests/torch_parity/vit_torch.py BUILD/tests/torch_parity/moe_torch_parity_vit_dump

runs the dump program, loads every dumped variant's parameters into this module (float64), and
compares the logits, the loss and every parameter gradient; then prints the parameter count of
each variant at vit::Config::small() (bench_vit_train's `parameters` counter is the C++ side's).
"""
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt2_torch  # noqa: E402  (the MoE layer and the GELU MLP)

VARIANTS = ("dense", "linear", "self", "fixed-random", "random")
LAYERNORM_EPS = 1e-5


@dataclass
class Config:
    image_size: int = 28  # S
    channels: int = 1     # C
    patch: int = 7        # P
    classes: int = 10
    layers: int = 6       # L
    heads: int = 4        # NH
    hidden: int = 128     # H
    ffn: int = 256        # F, of the dense MLP and of each expert
    experts: int = 4      # N
    top_k: int = 2        # k
    moe_every: int = 2

    @staticmethod
    def small():
        return Config()

    @property
    def patches_per_side(self):
        return self.image_size // self.patch

    @property
    def tokens(self):  # T: the class token + the patches
        return 1 + self.patches_per_side ** 2

    def is_moe_block(self, block):
        return block % self.moe_every == self.moe_every - 1


class Attention(nn.Module):
    """timm's Attention: qkv [3H, H] with rows q | k | v, every token sees every token."""

    def __init__(self, config):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden)
        self.proj = nn.Linear(config.hidden, config.hidden)

    def forward(self, x):  # x: [B, T, H] -> [B, T, H]
        B, T, H = x.shape
        hs = H // self.heads
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, hs).permute(2, 0, 3, 1, 4)  # [B, NH, T, hs] each
        att = ((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, H))


class Block(nn.Module):
    def __init__(self, config, variant, moe_block):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden, eps=LAYERNORM_EPS)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden, eps=LAYERNORM_EPS)
        if moe_block:
            self.moe = gpt2_torch.MoE(config, variant)
        else:
            self.mlp = gpt2_torch.GeluMLP(config.hidden, config.ffn, fc="fc1", proj="fc2")

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        y = self.norm2(x)
        if hasattr(self, "mlp"):
            return x + self.mlp(y)
        return x + self.moe(y.reshape(-1, y.shape[-1])).view_as(y)  # the B*T tokens as one batch


class ViT(nn.Module):
    def __init__(self, config, variant):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r} (valid: {', '.join(VARIANTS)})")
        if config.image_size % config.patch != 0:
            raise ValueError(f"image_size {config.image_size} is not divisible by patch {config.patch}")
        self.config, self.variant = config, variant
        H = config.hidden
        self.cls_token = nn.Parameter(torch.zeros(1, 1, H))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.tokens, H))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(config.channels * config.patch ** 2, H)
        self.blocks = nn.ModuleList(Block(config, variant, variant != "dense" and config.is_moe_block(l))
                                    for l in range(config.layers))
        self.norm = nn.LayerNorm(H, eps=LAYERNORM_EPS)
        self.head = nn.Linear(H, config.classes)
        self.init_timm()

    def init_timm(self):
        """As the C++ model: N(0, 0.02^2) tokens, positions and Linear weights, zero biases, unit
        LayerNorm weights, the patch embedding std 1/sqrt(3 fan_in), routers N(0, 1/H)."""
        fan_in = self.config.channels * self.config.patch ** 2
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("router.weight"):
                    p.normal_(0.0, 1.0 / math.sqrt(self.config.hidden))
                elif name == "patch_embed.proj.weight":
                    p.normal_(0.0, 1.0 / math.sqrt(3.0 * fan_in))
                elif name.endswith(".bias"):
                    p.zero_()
                elif re.search(r"norm\d?\.weight$", name):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)

    def patches(self, images):  # [B, C, S, S] or [B, C*S*S] -> [B, Np, C*P*P], columns (c, y, x)
        c = self.config
        G, P = c.patches_per_side, c.patch
        x = images.reshape(-1, c.channels, G, P, G, P)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], G * G, c.channels * P * P)

    def forward(self, images, labels=None):
        """images: [B, C, S, S] (or [B, C*S*S]), labels: [B] int64 -> logits [B, classes], mean loss (or None)."""
        x = self.patch_embed.proj(self.patches(images))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x[:, 0]))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return logits, loss

    def moe_layers(self):
        return [block.moe for block in self.blocks if hasattr(block, "moe")]

    # ---- the library's names and layouts ----

    _EXPERT = re.compile(r"^(blocks\.\d+\.moe\.experts)\.(\d+)\.(fc|proj)\.(weight|bias)$")

    def library_names(self):
        """The C++ model's parameter names, in its order (frozen ones included)."""
        names = []
        for name, _ in self.named_parameters():
            match = self._EXPERT.match(name)
            if match is None:
                names.append(name)
            elif match.group(2) == "0":
                names.append(f"{match.group(1)}.{match.group(3)}.{match.group(4)}")
        return names

    def library_tensors(self, gradients=False):
        """{library name: tensor in the library's layout}, values or gradients (zeros for an
        expert that saw no token; frozen parameters are left out of the gradients)."""
        pick = (lambda p: p.grad if p.grad is not None else torch.zeros_like(p)) if gradients else (lambda p: p.detach())
        out, stacked = {}, {}
        for name, p in self.named_parameters():
            match = self._EXPERT.match(name)
            if match:
                stacked.setdefault(f"{match.group(1)}.{match.group(3)}.{match.group(4)}", []).append(pick(p))
            elif not (gradients and not p.requires_grad):
                out[name] = pick(p)
        out.update({name: torch.stack(parts) for name, parts in stacked.items()})
        c = self.config
        out["patch_embed.proj.weight"] = out["patch_embed.proj.weight"].reshape(c.hidden, c.channels, c.patch, c.patch)
        return {name: out[name] for name in self.library_names() if name in out}

    def load_library_tensors(self, tensors):
        """Copies values given under the library's names and shapes (torch tensors or numpy arrays)."""
        params = dict(self.named_parameters())
        expected = self.library_names()
        missing = [name for name in expected if name not in tensors]
        if missing:
            raise KeyError(f"missing parameters: {missing}")
        with torch.no_grad():
            for name in expected:
                value = torch.as_tensor(tensors[name])
                if name == "patch_embed.proj.weight":
                    value = value.reshape(value.shape[0], -1)  # [H, C, P, P] -> nn.Linear's [H, C*P*P]
                if name in params:
                    targets, parts = [params[name]], [value]
                else:  # stacked experts
                    prefix, rest = name.rsplit(".experts.", 1)
                    targets = [params[f"{prefix}.experts.{e}.{rest}"] for e in range(self.config.experts)]
                    if value.shape[0] != len(targets):
                        raise ValueError(f"{name}: {value.shape[0]} experts, the model has {len(targets)}")
                    parts = list(value)
                for target, part in zip(targets, parts):
                    if tuple(part.shape) != tuple(target.shape):
                        raise ValueError(f"{name}: shape {tuple(part.shape)}, the model's is {tuple(target.shape)}")
                    target.copy_(part)


# ---- the quick check against the C++ model --------------------------------------------------

def check_against_dump(dump_exe, tolerance=1e-4):
    """Loads every variant the dump program writes into this module; returns the failure count."""
    import subprocess
    import tempfile

    import numpy as np
    import vit_parity  # the dump reader

    def relative_error(ours, ref):
        ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
        return float(np.max(np.abs(ours - ref))) / max(float(np.max(np.abs(ref))), 1e-30)

    failures = 0
    with tempfile.TemporaryDirectory(prefix="vit_torch_check_") as folder:
        run = subprocess.run([dump_exe, folder])
        if run.returncode != 0:
            print(f"FAIL the dump program exited with {run.returncode}")
            return 1
        for case in vit_parity.read_dump(folder):
            o = case.options
            config = Config(image_size=int(o["image_size"]), channels=int(o["channels"]), patch=int(o["patch"]),
                            classes=int(o["classes"]), layers=int(o["layers"]), heads=int(o["heads"]),
                            hidden=int(o["hidden"]), ffn=int(o["ffn"]), experts=int(o["experts"]),
                            top_k=int(o["top_k"]), moe_every=int(o["moe_every"]))
            model = ViT(config, o["variant"]).double()
            model.load_library_tensors({name: case.tensors[name] for name in case.params})
            if o["variant"] == "random":  # the library's draws cannot be replayed here: hand them in
                for block, layer in zip((b for b in range(config.layers) if config.is_moe_block(b)), model.moe_layers()):
                    layer.set_random_logits(torch.tensor(case.tensors[f"blocks.{block}.moe.router_logits"]))
            images = torch.tensor(case.tensors["images"])
            labels = torch.tensor(case.tensors["labels"]).round().long()
            logits, loss = model(images, labels)
            loss.backward()
            grads = model.library_tensors(gradients=True)
            errors = {"logits": relative_error(case.tensors["logits"], logits.detach().numpy()),
                      "loss": relative_error(float(case.scalars["loss"]), float(loss))}
            errors["gradients (worst)"] = max(relative_error(case.tensors[name + ".grad"], grad.numpy())
                                              for name, grad in grads.items())
            ours_count = sum(case.tensors[name].size for name in case.params)
            torch_count = sum(p.numel() for p in model.parameters())
            ok = all(e < tolerance for e in errors.values()) and ours_count == torch_count \
                and len(grads) == sum(flags["grad"] for flags in case.params.values())
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {case.name:18s} loss C++ {float(case.scalars['loss']):.6f} "
                  f"torch {float(loss):.6f}  rel_err " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
                  + f"  parameters C++ {ours_count} torch {torch_count}")
    return failures


def main():
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} DUMP_EXE (the moe_torch_parity_vit_dump program)", file=sys.stderr)
        return 2
    failures = check_against_dump(sys.argv[1])
    print("vit::Config::small() parameter counts (torch):",
          ", ".join(f"{v} {sum(p.numel() for p in ViT(Config.small(), v).parameters())}" for v in VARIANTS))
    print("vit_torch: all variants match the C++ model" if failures == 0 else f"vit_torch: {failures} variant(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
