"""Traceable stand-ins for torch's attention and transformer modules.

torch.fx keeps every module of ``torch.nn`` opaque, and the forward of ``nn.MultiheadAttention``
and of the ``nn.Transformer*`` layers cannot be traced through anyway (it branches on tensor
properties to pick a fused kernel).  Left opaque, a transformer has nothing the unit analysis can
prune.  :func:`swap_known_modules` therefore replaces each such module, before tracing, by a module
of this file that computes the same function from plain parts:

* :class:`TracedMultiheadAttention`: separate ``q_proj``/``k_proj``/``v_proj`` Linear layers (the
  packed ``in_proj_weight`` is cut in three), a reshape to heads, ``scaled_dot_product_attention``
  (or ``softmax(QK^T)V`` when the attention weights are asked for) and ``out_proj``.  In the graph
  this is the hand-written attention pattern, whose heads the unit analysis finds.
* :class:`TracedEncoderLayer`, :class:`TracedEncoder`, :class:`TracedDecoderLayer`,
  :class:`TracedDecoder`: the same residual blocks around it, post- or pre-norm, with the FFN's
  Linear layers and LayerNorms as they were (FFN hidden units become prunable).

Masks (``attn_mask`` bool or additive, 2-D or per head, ``key_padding_mask``) are merged into one
additive mask by :func:`attention_mask`, a function that torch.fx keeps as one call (its branches
depend on the masks' dtype and rank).  ``is_causal`` is a hint in torch: ``attn_mask`` is used.
Attention dropout is decided when the graph is traced (oamipc traces in eval mode, so the
traced graph has none, and a fine-tune of it trains without attention dropout; the FFN and
residual dropout modules stay modules and follow train/eval as usual).

Not replaced (kept opaque, as before): ``add_bias_kv``, ``add_zero_attn`` and modules a user named
with ``--leaf-module``.  The replacement shares nothing mutable with the original tree, whose
modules stay as they were; the stand-ins hold copies of the weights.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

log = logging.getLogger(__name__)

__all__ = [
    "TracedDecoder", "TracedDecoderLayer", "TracedEncoder", "TracedEncoderLayer",
    "TracedMultiheadAttention", "attention_mask", "swap_known_modules",
]


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True: not allowed, torch's convention) as 0/-inf; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


@fx.wrap
def attention_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, q: Tensor, k: Tensor) -> Tensor:
    """One additive mask that broadcasts against scores of shape ``(B, H, L, S)``.

    ``attn_mask``: ``(L, S)`` or ``(B * H, L, S)`` (torch's per-head layout, batch-major);
    ``key_padding_mask``: ``(B, S)``.  Bool masks mark positions that may *not* be attended.
    Neither (the masks are inputs of a traced module and were not given): a zero mask.
    """
    batch, heads, length = q.shape[0], q.shape[1], q.shape[2]
    source = k.shape[2]
    merged: Tensor | None = None
    if attn_mask is not None:
        merged = _additive(attn_mask, q.dtype)
        if merged.dim() == 3:
            merged = merged.view(batch, heads, length, source)
    if key_padding_mask is not None:
        pad = _additive(key_padding_mask, q.dtype).view(batch, 1, 1, source)
        merged = pad if merged is None else merged + pad
    return torch.zeros((1, 1, 1, 1), dtype=q.dtype, device=q.device) if merged is None else merged


@fx.wrap
def zero_padded(x: Tensor, key_padding_mask: Tensor | None, mask: Tensor | None, batch_first: bool) -> Tensor:
    """Zero the padded positions, as ``nn.TransformerEncoder``'s nested-tensor inference path does.

    That path is taken with a key padding mask and without an attention mask.
    """
    if key_padding_mask is None or mask is not None:
        return x
    pad = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
    pad = pad if batch_first else pad.transpose(0, 1)
    return x.masked_fill(pad.unsqueeze(-1), 0.0)


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class TracedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` as separate projections and per-head attention (same outputs).

    ``num_heads`` and ``head_dim`` are plain ints baked into the traced graph's reshapes; pruning
    heads rewrites them there.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn have no traceable form here")
        e = mha.embed_dim
        bias = mha.in_proj_bias
        b = (None, None, None) if bias is None else (bias[:e], bias[e:2 * e], bias[2 * e:])
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight
            weights = (w[:e], w[e:2 * e], w[2 * e:])
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        self.q_proj = _linear(weights[0].detach(), None if b[0] is None else b[0].detach())
        self.k_proj = _linear(weights[1].detach(), None if b[1] is None else b[1].detach())
        self.v_proj = _linear(weights[2].detach(), None if b[2] is None else b[2].detach())
        self.out_proj = _linear(mha.out_proj.weight.detach(),
                                None if mha.out_proj.bias is None else mha.out_proj.bias.detach())
        self.num_heads = int(mha.num_heads)
        self.head_dim = int(mha.head_dim)
        self.batch_first = bool(mha.batch_first)
        self.dropout = float(mha.dropout)
        self.train(mha.training)

    def _heads(self, x: Tensor, batch: Any, length: Any) -> Tensor:
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if is_causal is True and attn_mask is None:  # as torch: the flag is a hint about attn_mask
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, length, source = query.shape[0], query.shape[1], key.shape[1]
        q = self._heads(self.q_proj(query), batch, length)
        k = self._heads(self.k_proj(key), batch, source)
        v = self._heads(self.v_proj(value), batch, source)
        mask = None
        if attn_mask is not None or key_padding_mask is not None:
            mask = attention_mask(attn_mask, key_padding_mask, q, k)
        p = self.dropout if self.training else 0.0
        weights: Tensor | None = None
        if need_weights:
            scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            weights = attn.mean(dim=1) if average_attn_weights else attn
            out = torch.matmul(F.dropout(attn, p, self.training), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _activation(act: Any) -> Any:
    return copy.deepcopy(act) if isinstance(act, nn.Module) else act


class TracedEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (post- or pre-norm) around :class:`TracedMultiheadAttention`."""

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self.self_attn = TracedMultiheadAttention(layer.self_attn)
        self.linear1, self.dropout, self.linear2 = (copy.deepcopy(m) for m in (layer.linear1, layer.dropout,
                                                                                layer.linear2))
        self.norm1, self.norm2 = copy.deepcopy(layer.norm1), copy.deepcopy(layer.norm2)
        self.dropout1, self.dropout2 = copy.deepcopy(layer.dropout1), copy.deepcopy(layer.dropout2)
        self.activation = _activation(layer.activation)
        self.norm_first = bool(layer.norm_first)
        self.train(layer.training)

    def _sa(self, x: Tensor, mask: Tensor | None, padding: Tensor | None) -> Tensor:
        return self.dropout1(self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False)[0])

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask))
        return self.norm2(x + self._ff(x))


class TracedEncoder(nn.Module):
    """``nn.TransformerEncoder``: its layers in turn, then the optional final norm.

    Where torch would take its nested-tensor inference path (``enable_nested_tensor`` accepted
    at construction, a key padding mask and no attention mask given), padded positions come out as
    zeros before the final norm; they are zeroed here too, so both agree in inference.
    """

    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_stand_in_or_copy(m) for m in encoder.layers)
        self.norm = copy.deepcopy(encoder.norm) if encoder.norm is not None else None
        self.zero_padding = bool(getattr(encoder, "use_nested_tensor", False))
        self.batch_first = bool(getattr(encoder.layers[0].self_attn, "batch_first", False))
        self.train(encoder.training)

    def forward(self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask)
        if self.zero_padding and src_key_padding_mask is not None:
            out = zero_padded(out, src_key_padding_mask, mask, self.batch_first)
        if self.norm is not None:
            out = self.norm(out)
        return out


class TracedDecoderLayer(nn.Module):
    """``nn.TransformerDecoderLayer``: self-attention, cross-attention on ``memory``, FFN."""

    def __init__(self, layer: nn.TransformerDecoderLayer) -> None:
        super().__init__()
        self.self_attn = TracedMultiheadAttention(layer.self_attn)
        self.multihead_attn = TracedMultiheadAttention(layer.multihead_attn)
        for name in ("linear1", "dropout", "linear2", "norm1", "norm2", "norm3", "dropout1", "dropout2",
                     "dropout3"):
            setattr(self, name, copy.deepcopy(getattr(layer, name)))
        self.activation = _activation(layer.activation)
        self.norm_first = bool(layer.norm_first)
        self.train(layer.training)

    def _sa(self, x: Tensor, mask: Tensor | None, padding: Tensor | None) -> Tensor:
        return self.dropout1(self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False)[0])

    def _mha(self, x: Tensor, mem: Tensor, mask: Tensor | None, padding: Tensor | None) -> Tensor:
        return self.dropout2(self.multihead_attn(x, mem, mem, attn_mask=mask, key_padding_mask=padding,
                                                 need_weights=False)[0])

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        x = tgt
        if self.norm_first:
            x = x + self._sa(self.norm1(x), tgt_mask, tgt_key_padding_mask)
            x = x + self._mha(self.norm2(x), memory, memory_mask, memory_key_padding_mask)
            return x + self._ff(self.norm3(x))
        x = self.norm1(x + self._sa(x, tgt_mask, tgt_key_padding_mask))
        x = self.norm2(x + self._mha(x, memory, memory_mask, memory_key_padding_mask))
        return self.norm3(x + self._ff(x))


class TracedDecoder(nn.Module):
    """``nn.TransformerDecoder``: its layers in turn, then the optional final norm."""

    def __init__(self, decoder: nn.TransformerDecoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_stand_in_or_copy(m) for m in decoder.layers)
        self.norm = copy.deepcopy(decoder.norm) if decoder.norm is not None else None
        self.train(decoder.training)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> Tensor:
        out = tgt
        for layer in self.layers:
            out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask,
                        memory_key_padding_mask=memory_key_padding_mask)
        if self.norm is not None:
            out = self.norm(out)
        return out


_REPLACEMENTS: dict[type[nn.Module], Callable[[Any], nn.Module]] = {
    nn.MultiheadAttention: TracedMultiheadAttention,
    nn.TransformerEncoderLayer: TracedEncoderLayer,
    nn.TransformerEncoder: TracedEncoder,
    nn.TransformerDecoderLayer: TracedDecoderLayer,
    nn.TransformerDecoder: TracedDecoder,
}


def _replacement(module: nn.Module) -> nn.Module | None:
    """The traceable stand-in of ``module`` (exact type match), or None when there is none."""
    make = _REPLACEMENTS.get(type(module))
    if make is None:
        return None
    try:
        return make(module)
    except ValueError as exc:
        log.info("%s kept opaque: %s", type(module).__name__, exc)
        return None


def _stand_in_or_copy(module: nn.Module) -> nn.Module:
    new = _replacement(module)
    return copy.deepcopy(module) if new is None else new


def swap_known_modules(model: nn.Module, keep: frozenset[str] = frozenset()) -> nn.Module:
    """``model`` with every known attention/transformer module replaced by its traceable stand-in.

    ``model`` itself is not changed: modules on the path to a replaced one are shallow copies
    (their own child table, shared parameters), everything else is shared.  Names in ``keep``
    (qualified, as for ``--leaf-module``) are left as they are.  Qualified names do not change.
    """
    swapped = _swap(model, "", keep)
    return model if swapped is None else swapped


def _swap(module: nn.Module, prefix: str, keep: frozenset[str]) -> nn.Module | None:
    if prefix in keep:
        return None
    new = _replacement(module)
    if new is not None:
        log.info("%s (%s) traced as its stand-in %s", prefix or "the model", type(module).__name__,
                 type(new).__name__)
        return new
    changed: dict[str, nn.Module] = {}
    for name, child in module.named_children():
        swapped = _swap(child, f"{prefix}.{name}" if prefix else name, keep)
        if swapped is not None:
            changed[name] = swapped
    if not changed:
        return None
    shell = copy.copy(module)
    shell._modules = dict(module._modules)
    for name, child in changed.items():
        shell._modules[name] = child
    return shell
