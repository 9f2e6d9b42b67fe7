"""Mixture-of-experts layers as linears: every expert's gate, up and down projections become `nn.Linear`s, so
every method (pruning, GPTQ, AWQ, low-rank, ...) reaches them, and every expert is calibrated.

transformers keeps the experts of Mixtral, Qwen3-MoE, OLMoE, ... as two 3-D parameters per block
(`gate_up_proj` [experts, 2 x inter, hidden], `down_proj` [experts, hidden, inter]); methods written for linears
would skip them and save a model compressed in part. `unfuse_experts_(model)` replaces each such module by
`LinearExperts`, one `ExpertMLP` (gate_proj, up_proj, down_proj) per expert, named `mlp.experts.<e>.<proj>` - the
per-expert names transformers itself writes to disk for these families. Routing stays the model's own: the
router (`mlp.gate`) is not a linear and no method touches it, except that scale folding (AWQ, SmoothQuant)
multiplies its input columns exactly as it does the experts', so its logits do not change.

Two forwards, the same output:

    routed  (default): each expert runs on the tokens the router sent it, as transformers does;
    dense   (`all_experts(model)`, calibration and ONNX export): every expert runs on every token and its output
            is weighted by the routing weight, 0 where it was not chosen. So every expert sees every calibration
            token, including the experts the router sends few or none (the approach of llm-compressor's
            calibrate_all_experts), while the block's output - what the next block is calibrated on - is the real
            routing's. The experts' gate/up read one tensor, so they share one set of statistics (one Hessian).
            The graph has no data-dependent shapes, which the ONNX exporter needs; it costs experts / top-k
            times the routed compute.

How many calibration tokens the router really sent each expert is counted (`routed_tokens`) and reported per
layer; `experts.min_tokens` in the recipe sets the floor below which the run warns or fails, and the gate's
`min_expert_tokens` can refuse the model.

A plain folder is saved with the experts fused back (`stock_layout`) and written by transformers itself, in the
checkpoint layout it writes for these families (per expert, e.g. Mixtral's block_sparse_moe.experts.<e>.w1),
which stock transformers loads. The llmpress layout keeps the per-expert linears under their module names (their
codes) and `load_compressed` unfuses the built model before loading them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from llmpress.errors import LlmpressError


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, act_fn: nn.Module, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:  # fmt: skip
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, inter, bias=bias, dtype=dtype, device=device)
        self.down_proj = nn.Linear(inter, hidden, bias=bias, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LinearExperts(nn.Module):
    """The experts of one MoE block as `ExpertMLP`s `0 .. n-1`; called like transformers' experts module:
    (hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k]) -> [tokens, hidden]."""

    def __init__(self, experts: list[ExpertMLP], stock: type[nn.Module], config: object) -> None:
        super().__init__()
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.num_experts = len(experts)
        self.dense = False  # True: every expert on every token (`all_experts`)
        self._stock, self._config = stock, config  # to fuse back for plain folders (`stock_layout`)

    def experts(self) -> list[ExpertMLP]:
        return [getattr(self, str(e)) for e in range(self.num_experts)]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        if self.dense or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            return self._dense(hidden_states, top_k_index, top_k_weights)
        return self._routed(hidden_states, top_k_index, top_k_weights)

    def _dense(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # [tokens, experts] routing weights, 0 where an expert was not chosen; index n (padding) is dropped
        chosen = nn.functional.one_hot(top_k_index, self.num_experts + 1)[..., : self.num_experts]
        weights = (chosen.to(top_k_weights.dtype) * top_k_weights.unsqueeze(-1)).sum(dim=1)
        # a 3-D input so that the exported graph has MatMul on the transposed weights (2-D would export as Gemm),
        # which the ONNX export packs into MatMulNBits for quantized experts
        x3, out = x.unsqueeze(0), torch.zeros_like(x)
        for e, expert in enumerate(self.experts()):
            out = out + (expert(x3)[0] * weights[:, e, None]).to(out.dtype)
        return out

    def _routed(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        with torch.no_grad():
            hit = torch.bincount(top_k_index.flatten(), minlength=self.num_experts + 1)[: self.num_experts]
        for e in hit.nonzero().flatten().tolist():
            token, position = torch.where(top_k_index == e)
            y = getattr(self, str(e))(x[token]) * top_k_weights[token, position, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    weight = getattr(module, "gate_up_proj", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 3


def _refuse(name: str, module: nn.Module, why: str) -> LlmpressError:
    return LlmpressError(f"{name} ({type(module).__name__}): {why}; llmpress unfuses experts stored as "
                         "gate_up_proj [experts, 2 x inter, hidden] and down_proj [experts, hidden, inter] with "
                         "act(gate) * up (Mixtral, Qwen3-MoE, OLMoE)")  # fmt: skip


@torch.no_grad()
def unfuse(name: str, module: nn.Module) -> LinearExperts:
    """The `LinearExperts` computing what a transformers experts module computes, with copies of its weights."""
    from transformers.integrations import moe

    if getattr(module, "has_post_expert_norm", False) or not getattr(module, "has_gate", True):
        raise _refuse(name, module, "experts with a post-expert norm or without a gate projection")
    apply_gate = getattr(type(module), "_apply_gate", moe._default_apply_gate)
    if apply_gate is not moe._default_apply_gate:
        raise _refuse(name, module, "a custom gating function")
    gate_up, down = module.gate_up_proj, module.down_proj
    if getattr(module, "is_transposed", False):  # [experts, hidden, 2 x inter] and [experts, inter, hidden]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    n, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    if down.shape != (n, hidden, inter):
        raise _refuse(name, module, f"down_proj {tuple(down.shape)} does not match gate_up_proj {tuple(gate_up.shape)}")
    concatenated = getattr(module, "is_concatenated", True)
    bias = bool(getattr(module, "has_bias", False))
    experts = []
    for e in range(n):
        expert = ExpertMLP(hidden, inter, module.act_fn, bias, gate_up.dtype, gate_up.device)
        rows = gate_up[e]
        gate, up = (rows[:inter], rows[inter:]) if concatenated else (rows[0::2], rows[1::2])
        expert.gate_proj.weight.copy_(gate)
        expert.up_proj.weight.copy_(up)
        expert.down_proj.weight.copy_(down[e])
        if bias:
            b = module.gate_up_proj_bias[e]
            expert.gate_proj.bias.copy_(b[:inter] if concatenated else b[0::2])
            expert.up_proj.bias.copy_(b[inter:] if concatenated else b[1::2])
            expert.down_proj.bias.copy_(module.down_proj_bias[e])
        experts.append(expert)
    return LinearExperts(experts, type(module), module.config)


def unfuse_experts_(model: nn.Module) -> list[str]:
    """Replace every fused experts module of `model` by `LinearExperts` (in place; a no-op when there are none or
    they are unfused already). Returns the names of the experts modules now linear."""
    from llmpress.compress.storage import set_submodule

    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LinearExperts):
            names.append(name)
        elif _is_fused_experts(module):
            set_submodule(model, name, unfuse(name, module))
            names.append(name)
    return names


def has_experts(model: nn.Module) -> bool:
    """True for a mixture of experts, its experts fused or linear."""
    return any(isinstance(m, LinearExperts) or _is_fused_experts(m) for m in model.modules())


def linear_experts(model: nn.Module) -> dict[str, LinearExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearExperts)}


@torch.no_grad()
def fuse(experts: LinearExperts) -> nn.Module:
    """The transformers experts module holding `experts`' current float weights (pruned zeros included)."""
    stock = experts._stock(experts._config)
    members = experts.experts()
    first = members[0].gate_proj.weight
    gate_up = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in members])
    down = torch.stack([m.down_proj.weight for m in members])
    if not getattr(stock, "is_concatenated", True):  # interleaved rows: gate0, up0, gate1, ...
        inter = first.shape[0]
        gate_up = torch.stack([gate_up[:, :inter], gate_up[:, inter:]], dim=2).flatten(1, 2)
    if getattr(stock, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    stock.gate_up_proj = nn.Parameter(gate_up.contiguous(), requires_grad=False)
    stock.down_proj = nn.Parameter(down.contiguous(), requires_grad=False)
    if getattr(stock, "has_bias", False):
        b = torch.stack([torch.cat([m.gate_proj.bias, m.up_proj.bias]) for m in members])
        if not getattr(stock, "is_concatenated", True):
            inter = first.shape[0]
            b = torch.stack([b[:, :inter], b[:, inter:]], dim=2).flatten(1)
        stock.gate_up_proj_bias = nn.Parameter(b, requires_grad=False)
        stock.down_proj_bias = nn.Parameter(torch.stack([m.down_proj.bias for m in members]), requires_grad=False)
    return stock.to(first.device)


@contextlib.contextmanager
def stock_layout(model: nn.Module) -> Iterator[None]:
    """For the duration (`save_pretrained` of a plain folder), the experts as transformers keeps them."""
    from llmpress.compress.storage import set_submodule

    linear = linear_experts(model)
    for name, module in linear.items():
        set_submodule(model, name, fuse(module))
    try:
        yield
    finally:
        for name, module in linear.items():
            set_submodule(model, name, module)


@contextlib.contextmanager
def all_experts(model: nn.Module) -> Iterator[None]:
    """For the duration, every expert runs on every token (the dense forward; see the module docstring)."""
    linear = list(linear_experts(model).values())
    before = [m.dense for m in linear]
    for m in linear:
        m.dense = True
    try:
        yield
    finally:
        for m, dense in zip(linear, before, strict=True):
            m.dense = dense


class _Stop(Exception):
    pass


@torch.no_grad()
def routed_tokens(block: nn.Module, prefix: str, calib: object) -> dict[str, list[int]]:
    """{experts module name: tokens the router sent each expert} over the block's calibration batches. Each
    batch's forward stops at the last experts module, before any expert computes."""
    linear = {f"{prefix}.{n}": m for n, m in block.named_modules() if isinstance(m, LinearExperts)}
    if not linear:
        return {}
    counts = {name: torch.zeros(m.num_experts + 1, dtype=torch.long) for name, m in linear.items()}
    last = list(linear)[-1]

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            counts[name] += torch.bincount(args[1].flatten().cpu(), minlength=counts[name].numel())
            if name == last:
                raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in linear.items()]
    try:
        for h, kw in zip(calib.hidden, calib.kwargs, strict=True):
            with contextlib.suppress(_Stop):
                block(h, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return {name: c[:-1].tolist() for name, c in counts.items()}
