#!/usr/bin/python3
"""The GPT-2 MoE model of examples/gpt2_moe/model.hpp, in PyTorch (importable).

Used twice: as the reference of the whole-model parity test (tests/torch_parity/gpt2_parity.py,
which loads the C++ model's weights into it) and as the PyTorch peer of the training benchmark
(bench/torch_gpt2_train.py). float32 unless the caller converts it (`model.double()`).

The model, as the C++ one:
  x_0     = wte[tokens] + wpe[positions]
  a_l     = x_l + c_proj(causal attention(c_attn(ln_1(x_l))))
  x_{l+1} = a_l + FFN(ln_2(a_l))
  logits  = ln_f(x_L) wte^T                        (tied embeddings)
  loss    = mean cross-entropy over the targets that are not -1
pre-LayerNorm blocks (eps 1e-5), tanh-GELU, nn.Linear layouts ([out, in]).

The FFN is the dense GPT-2 MLP or an MoE layer that follows the library's semantics contract
(README "Semantics", moe/routing.hpp):
  gate:    self          logits = x[:, offset:offset+N], offset = H - N by default (the last N
                          coordinates, a view, the gradient flows back into x); with
                          Config.self_slice "per-layer", layer l's own N (Config.self_offset)
           linear        logits = x W^T, W [N, H] trained (nn.Linear(H, N, bias=False))
           fixed-random  the same projection, frozen (no gradient for W, x's gradient flows)
           random        N(0, 1) logits, no gradient. The library draws them from its own
                          counter-based generator, so a caller that wants the same routing hands
                          them in (`set_random_logits`); otherwise torch.randn draws them
           With Config.route_from_residual the gate reads the residual stream before ln_2
           instead of ln_2's output (the experts still read ln_2's output).
  select:  the top k logits, larger first, equal values by the lower expert index
  weights: softmax_over_top_k (the library's default, paper eq. 2): softmax over the k selected
           logits; softmax_then_top_k: softmax over all N, the selected probabilities kept
  combine: y_t = sum_j w_tj E_{e_tj}(x_t); dropless (no capacity)
and is written in the common eager style (Hugging Face's Mixtral block): a Python loop over the
experts, each an nn.Module, fed by index_select and summed back with index_add_.

Parameter names are Hugging Face GPT-2's (wte.weight, h.0.attn.c_attn.weight, ...). The experts
are a ModuleList here (h.0.moe.experts.3.fc.weight [F, H]); the library stacks them
(h.0.moe.experts.fc.weight [N, F, H]). `library_tensors()` and `load_library_tensors()` translate.
"""
import math
import re
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

VARIANTS = ("dense", "linear", "self", "fixed-random", "random")
WEIGHTINGS = ("softmax_over_top_k", "softmax_then_top_k")
LAYERNORM_EPS = 1e-5
IGNORE_TARGET = -1


@dataclass
class Config:
    vocab: int = 256     # V
    context: int = 128   # maxT
    layers: int = 4      # L
    heads: int = 4       # NH
    hidden: int = 128    # H
    ffn: int = 512       # F, of the dense MLP and of each expert
    experts: int = 8     # N
    top_k: int = 2       # k
    # MoE: the gate reads the residual stream before ln_2 instead of ln_2's output (the experts
    # always read ln_2's output), as gpt2::Config::route_from_residual.
    route_from_residual: bool = False
    # The self gate's coordinates, as gpt2::Config::self_slice: "last" (every layer the last N) or
    # "per-layer" (layer l reads [H - N(l + 1), H - N l), from the end again after H / N layers).
    self_slice: str = "last"

    def self_offset(self, layer):
        if self.self_slice == "last":
            return self.hidden - self.experts
        if self.self_slice == "per-layer":
            return self.hidden - self.experts * (1 + layer % (self.hidden // self.experts))
        raise ValueError(f"unknown self slice {self.self_slice!r} (valid: last, per-layer)")

    @staticmethod
    def small():
        return Config()


# ---- attention and the dense MLP ------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.heads
        self.c_attn = nn.Linear(config.hidden, 3 * config.hidden)  # rows q | k | v
        self.c_proj = nn.Linear(config.hidden, config.hidden)
        self.register_buffer("mask", torch.ones(config.context, config.context, dtype=torch.bool).triu(1),
                             persistent=False)

    def forward(self, x):  # x: [B, T, H] -> [B, T, H]
        B, T, H = x.shape
        hs = H // self.heads
        q, k, v = self.c_attn(x).split(H, dim=2)
        q, k, v = (part.view(B, T, self.heads, hs).transpose(1, 2) for part in (q, k, v))  # [B, NH, T, hs]
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        att = scores.masked_fill(self.mask[:T, :T], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, H)
        return self.c_proj(y)


class GeluMLP(nn.Module):
    """GPT-2's MLP, also one expert: H -> F (bias), tanh-GELU, F -> H (bias)."""

    def __init__(self, hidden, ffn, fc="c_fc", proj="c_proj"):
        super().__init__()
        self.fc_name, self.proj_name = fc, proj
        self.add_module(fc, nn.Linear(hidden, ffn))
        self.add_module(proj, nn.Linear(ffn, hidden))

    def forward(self, x):
        hidden = F.gelu(getattr(self, self.fc_name)(x), approximate="tanh")
        return getattr(self, self.proj_name)(hidden)


# ---- the MoE layer --------------------------------------------------------------------------

class MoE(nn.Module):
    """MoELayer<Gate, GeluMLP>: gate, top-k, weights, a loop over the experts, combine."""

    def __init__(self, config, gate, weights="softmax_over_top_k", self_offset=None):
        super().__init__()
        if gate not in VARIANTS or gate == "dense":
            raise ValueError(f"unknown gate {gate!r} (valid: linear, self, fixed-random, random)")
        if weights not in WEIGHTINGS:
            raise ValueError(f"unknown weights {weights!r} (valid: {', '.join(WEIGHTINGS)})")
        H, N = config.hidden, config.experts
        if gate == "self" and H < N:
            raise ValueError(f"self routing reads N = {N} coordinates but H = {H}")
        self.gate, self.weights, self.experts_count, self.top_k = gate, weights, N, config.top_k
        self.self_offset = H - N if self_offset is None else self_offset
        if gate in ("linear", "fixed-random"):
            self.router = nn.Linear(H, N, bias=False)
            self.router.weight.requires_grad_(gate == "linear")
        self.experts = nn.ModuleList(GeluMLP(H, config.ffn, fc="fc", proj="proj") for _ in range(N))
        self.random_logits = []  # queued [T, N] logits for the random gate, one per forward
        self.last_logits = self.last_choices = None

    def set_random_logits(self, logits):
        self.random_logits.append(logits)

    def logits(self, x):  # x: [T, H] (the router input) -> [T, N]
        if self.gate == "self":
            return x[:, self.self_offset:self.self_offset + self.experts_count]  # paper eq. 5
        if self.gate in ("linear", "fixed-random"):
            return self.router(x)  # paper eq. 3
        if self.random_logits:
            return self.random_logits.pop(0).to(x.dtype)
        return torch.randn(x.shape[0], self.experts_count, dtype=x.dtype)

    def forward(self, x, router_input=None):  # x: [T, H] -> y: [T, H]; the gate reads router_input or x
        logits = self.logits(x if router_input is None else router_input)
        # Larger first, ties by the lower index: a stable descending sort keeps index order.
        ordered, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        top_values, top_experts = ordered[:, :self.top_k], order[:, :self.top_k]
        if self.weights == "softmax_over_top_k":
            weights = top_values.softmax(dim=-1)  # paper eq. 2
        else:
            weights = logits.softmax(dim=-1).gather(1, top_experts)
        self.last_logits, self.last_choices = logits.detach(), top_experts.detach()

        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, choice = torch.where(top_experts == e)
            if token.numel() == 0:
                continue
            out = expert(x.index_select(0, token)) * weights[token, choice].unsqueeze(1)
            y.index_add_(0, token, out)
        return y


# ---- the model ------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, config, variant, **moe_options):
        super().__init__()
        self.route_from_residual = config.route_from_residual
        self.ln_1 = nn.LayerNorm(config.hidden, eps=LAYERNORM_EPS)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden, eps=LAYERNORM_EPS)
        if variant == "dense":
            self.mlp = GeluMLP(config.hidden, config.ffn)
        else:
            self.moe = MoE(config, variant, **moe_options)

    def ffn(self, x, residual):  # [B, T, H]: the MoE layer sees the B*T tokens as one batch
        if hasattr(self, "mlp"):
            return self.mlp(x)
        H = x.shape[-1]
        router_input = residual.reshape(-1, H) if self.route_from_residual else None
        return self.moe(x.reshape(-1, H), router_input).view_as(x)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.ffn(self.ln_2(x), x)


def init_gpt2_(module, hidden, layers):
    """GPT-2's initialisation, as the C++ model, by parameter name (so it also initialises a lone
    MoE layer): N(0, 0.02^2) weights, residual projections scaled by 1/sqrt(2L), zero biases, unit
    LayerNorm weights, routers N(0, 1/H)."""
    residual_std = 0.02 / math.sqrt(2 * layers)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0.0, 1.0 / math.sqrt(hidden))
            elif name.endswith(".bias"):
                p.zero_()
            elif "ln_" in name:
                p.fill_(1.0)
            elif re.search(r"(c_proj|\.proj)\.weight$", name):
                p.normal_(0.0, residual_std)
            else:
                p.normal_(0.0, 0.02)


class GPT(nn.Module):
    def __init__(self, config, variant, **moe_options):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r} (valid: {', '.join(VARIANTS)})")
        self.config, self.variant = config, variant
        self.wte = nn.Embedding(config.vocab, config.hidden)
        self.wpe = nn.Embedding(config.context, config.hidden)
        # Each layer's self offset from the config, unless the caller names one for every layer.
        self.h = nn.ModuleList(Block(config, variant, **{"self_offset": config.self_offset(l), **moe_options})
                               for l in range(config.layers))
        self.ln_f = nn.LayerNorm(config.hidden, eps=LAYERNORM_EPS)
        self.init_gpt2()

    def init_gpt2(self):
        init_gpt2_(self, self.config.hidden, self.config.layers)

    def forward(self, tokens, targets=None):
        """tokens, targets: [B, T] int64 (-1: ignored) -> logits [B, T, V], mean loss (or None)."""
        B, T = tokens.shape
        if T > self.config.context:
            raise ValueError(f"sequence length {T} exceeds the context {self.config.context}")
        x = self.wte(tokens) + self.wpe(torch.arange(T, device=tokens.device))
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied: the output projection is wte
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1), ignore_index=IGNORE_TARGET)
        return logits, loss

    def moe_layers(self):
        return [block.moe for block in self.h if hasattr(block, "moe")]

    # ---- the library's names and layouts ----

    _EXPERT = re.compile(r"^(h\.\d+\.moe\.experts)\.(\d+)\.(fc|proj)\.(weight|bias)$")

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

    def _expert_tensors(self, pick):
        """{library name: [N, ...] stacked pick(param) over the experts} for every MoE layer."""
        stacked = {}
        for name, p in self.named_parameters():
            match = self._EXPERT.match(name)
            if match:
                key = f"{match.group(1)}.{match.group(3)}.{match.group(4)}"
                stacked.setdefault(key, []).append(pick(p))
        return {key: torch.stack(parts) for key, parts in stacked.items()}

    def library_tensors(self, gradients=False):
        """{library name: tensor}, values or gradients (zeros for an expert that saw no token;
        frozen parameters are left out of the gradients)."""
        pick = (lambda p: p.grad if p.grad is not None else torch.zeros_like(p)) if gradients else (lambda p: p.detach())
        out = {}
        stacked = self._expert_tensors(pick)
        for name, p in self.named_parameters():
            match = self._EXPERT.match(name)
            if match is None:
                if gradients and not p.requires_grad:
                    continue
                out[name] = pick(p)
        out.update(stacked)
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
                if name in params:
                    targets = [params[name]]
                    parts = [value]
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
