"""``prune_embed``: a transformer's residual stream as one prunable group, kept by default.

Oracles: the networks are computed a second time by hand (``torch.nn.functional``, written here
from each model's definition) with only the kept stream channels of every weight, embedding,
class token, positional embedding and LayerNorm; the hand computation with every channel kept is
first checked against the model itself.  onnxruntime checks the exported pruned files.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oamipc
import oamipc.models
from oamipc.export import export_onnx, verify_onnx
from oamipc.passes import count_costs
from oamipc.passes.unit_groups import STREAM_REASON, UnitGroupAnalysis
from oamipc.surgery import apply_plan
from oamipc.tracing import trace
from oamipc.units import UnitGraph

E, H, FFN, SEQ, VOCAB = 16, 4, 32, 6, 11
CRITERIA = ["l1", "l2", "activation", "taylor", "random"]


class EncoderCls(nn.Module):
    """An embedding (Linear on features, or ``nn.Embedding`` on token ids), a class token and a
    positional embedding, torch's ``nn.TransformerEncoder`` (post- or pre-norm, final LayerNorm),
    a classifier on the class token.  ``mask``: none, causal (a buffer) or key padding (tokens
    that are all zero, or id 0)."""

    def __init__(self, *, tokens: bool = False, mask: str = "none", norm_first: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, E) if tokens else nn.Linear(8, E)
        self.cls = nn.Parameter(torch.randn(1, 1, E) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, SEQ + 1, E) * 0.5)
        layer = nn.TransformerEncoderLayer(E, H, FFN, dropout=0.1, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E), enable_nested_tensor=False)
        self.head = nn.Linear(E, 5)
        self.tokens, self.mask, self.norm_first = tokens, mask, norm_first
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(SEQ + 1))

    def padding(self, x: torch.Tensor) -> torch.Tensor:
        pad = x == 0 if self.tokens else x.abs().sum(-1) == 0
        return torch.cat([torch.zeros_like(pad[:, :1]), pad], dim=1)  # the class token is never padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        if self.mask == "causal":
            h = self.encoder(h, mask=self.causal, is_causal=True)
        elif self.mask == "padding":
            h = self.encoder(h, src_key_padding_mask=self.padding(x))
        else:
            h = self.encoder(h)
        return self.head(h[:, 0])


def _ln(norm: nn.LayerNorm, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (len(idx),), norm.weight[idx], norm.bias[idx], norm.eps)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _attention(layer: nn.TransformerEncoderLayer, t: torch.Tensor, idx: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    att = layer.self_attn
    w, b = att.in_proj_weight, att.in_proj_bias
    q, k, v = (_heads(F.linear(t, w[i * E:(i + 1) * E][:, idx], b[i * E:(i + 1) * E]), H) for i in range(3))
    y = _merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    return F.linear(y, att.out_proj.weight[idx], att.out_proj.bias[idx])


def _ffn(layer: nn.TransformerEncoderLayer, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    hidden = F.relu(F.linear(t, layer.linear1.weight[:, idx], layer.linear1.bias))
    return F.linear(hidden, layer.linear2.weight[idx], layer.linear2.bias[idx])


def encoder_by_hand(m: EncoderCls, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``EncoderCls`` in eval mode with only the stream channels ``idx`` (by hand)."""
    h = m.embed.weight[x][..., idx] if m.tokens else F.linear(x, m.embed.weight[idx], m.embed.bias[idx])
    h = torch.cat([m.cls[..., idx].expand(len(x), -1, -1), h], dim=1) + m.pos[..., idx]
    mask = None
    if m.mask == "causal":
        mask = m.causal
    elif m.mask == "padding":
        mask = torch.zeros(m.padding(x).shape).masked_fill(m.padding(x), float("-inf"))[:, None, None, :]
    for layer in m.encoder.layers:
        if m.norm_first:
            h = h + _attention(layer, _ln(layer.norm1, h, idx), idx, mask)
            h = h + _ffn(layer, _ln(layer.norm2, h, idx), idx)
        else:
            h = _ln(layer.norm1, h + _attention(layer, h, idx, mask), idx)
            h = _ln(layer.norm2, h + _ffn(layer, h, idx), idx)
    h = _ln(m.encoder.norm, h, idx)
    return F.linear(h[:, 0], m.head.weight[:, idx], m.head.bias)


def vit_by_hand(m: oamipc.models.ViT, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``oamipc.models.ViT`` with only the stream channels ``idx`` (by hand)."""
    pe = m.patch_embed
    h = F.conv2d(x, pe.weight[idx], pe.bias[idx], stride=pe.stride).flatten(2).transpose(1, 2)
    h = torch.cat([m.cls_token[..., idx].expand(len(x), -1, -1), h], dim=1) + m.pos_embed[..., idx]
    for blk in m.blocks:
        a, heads = _ln(blk.norm1, h, idx), blk.attn.heads
        q, k, v = (_heads(F.linear(a, p.weight[:, idx], p.bias), heads) for p in (blk.attn.q, blk.attn.k, blk.attn.v))
        h = h + F.linear(_merge(F.scaled_dot_product_attention(q, k, v)), blk.attn.proj.weight[idx],
                         blk.attn.proj.bias[idx])
        hidden = F.gelu(F.linear(_ln(blk.norm2, h, idx), blk.fc1.weight[:, idx], blk.fc1.bias))
        h = h + F.linear(hidden, blk.fc2.weight[idx], blk.fc2.bias[idx])
    return F.linear(_ln(m.norm, h, idx)[:, 0], m.head.weight[:, idx], m.head.bias)


def _build(make, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make().eval()


def _vit() -> nn.Module:
    return oamipc.models.ViT(dim=E, depth=2, heads=H, mlp=FFN)


def _features(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, SEQ, 8, generator=torch.Generator().manual_seed(seed))
    for i in range(n):
        x[i, SEQ - 1 - i % 3:] = 0  # the last 0-2 tokens of each sequence are padding
    return x


def _token_ids(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randint(1, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    for i in range(n):
        x[i, SEQ - 1 - i % 3:] = 0
    return x


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _units(model: nn.Module, x: torch.Tensor, prune_embed: bool) -> tuple[torch.fx.GraphModule, UnitGraph]:
    gm = trace(model, (x,))
    return gm, UnitGroupAnalysis(prune_embed=prune_embed).run(gm, None)  # type: ignore[arg-type]


def _stream(graph: UnitGraph, producer: str) -> dict[int, int]:
    """Channel -> unit of the residual stream, read from a layer that writes it."""
    return {c: u for u, members in graph.members.items() for t, c in members if t == producer}


CASES = {
    "vit": (_vit, _images, "blocks.1.fc2", vit_by_hand),
    "encoder": (lambda: EncoderCls(), _features, "encoder.layers.1.linear2", encoder_by_hand),
    "encoder-causal-prenorm": (lambda: EncoderCls(mask="causal", norm_first=True), _features,
                               "encoder.layers.1.linear2", encoder_by_hand),
    "encoder-padding": (lambda: EncoderCls(mask="padding"), _features, "encoder.layers.1.linear2", encoder_by_hand),
    "tokens-padding": (lambda: EncoderCls(tokens=True, mask="padding"), _token_ids, "encoder.layers.1.linear2",
                       encoder_by_hand),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_hand_computation_is_the_model(name: str) -> None:
    make, data, _, by_hand = CASES[name]
    model, x = _build(make), data(8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(by_hand(model, x, torch.arange(E)), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_by_default_the_stream_is_kept(name: str) -> None:
    make, data, writer, _ = CASES[name]
    model, x = _build(make), data(32, seed=1)
    _, graph = _units(model, x[:2], prune_embed=False)
    stream = list(_stream(graph, writer).values())
    assert len(stream) == E and graph.pinned_mask()[stream].all()
    kw = {} if name.startswith("tokens") else {"data": (x, torch.randint(0, 5, (32,)))}  # token ids are not data
    res = oamipc.compile(model, x[:2], importance="l1", prune_ratio=0.5, **kw)
    assert res.module.get_submodule(writer).out_features == E
    assert res.report["settings"]["prune_embed"] is False
    assert res.report["after"]["macs"] < res.report["before"]["macs"]  # heads and FFN units still go
    pos = "pos_embed" if name == "vit" else "pos"
    assert getattr(res.module, pos).shape[-1] == E


def test_a_linear_embedded_stream_is_kept_by_default_for_the_layernorm() -> None:
    """Nothing but LayerNorm fixes this stream (no class token, mean over tokens): it is kept, saying why."""
    from tests.test_attention import EncoderNet

    model = _build(lambda: EncoderNet())
    x = _features(4)
    _, graph = _units(model, x, prune_embed=False)
    stream = list(_stream(graph, "embed").values())
    assert {graph.groups[graph.unit_group[u]].pinned[u] for u in stream} == {STREAM_REASON}
    _, graph = _units(model, x, prune_embed=True)
    assert not graph.pinned_mask()[list(_stream(graph, "embed").values())].any()


@pytest.mark.parametrize("name", list(CASES))
def test_removed_stream_channels_compute_what_the_hand_computation_does(name: str, tmp_path) -> None:
    make, data, writer, by_hand = CASES[name]
    model, x = _build(make), data(8, seed=3)
    gm, graph = _units(model, x[:2], prune_embed=True)
    stream = _stream(graph, writer)
    assert len(stream) == E and len(set(stream.values())) == E and not graph.pinned_mask()[list(stream.values())].any()
    group = graph.groups[graph.unit_group[stream[0]]]
    assert set(group.units) == set(stream.values())  # one group: every block's writers and readers
    drop = sorted(np.random.default_rng(0).choice(E, size=5, replace=False).tolist())
    kept = graph.all_kept()
    kept[[stream[c] for c in drop]] = False
    apply_plan(gm, graph, kept)
    idx = torch.tensor([c for c in range(E) if c not in drop])
    with torch.no_grad():
        torch.testing.assert_close(gm(x), by_hand(model, x, idx), rtol=1e-4, atol=1e-5)
    assert gm.get_submodule(writer).out_features == E - 5
    path = tmp_path / f"{name}.onnx"
    export_onnx(gm, (x[:2],), path)
    verify_onnx(path, gm, x)


def _stream_width(module: nn.Module, name: str) -> int:
    return module.get_submodule("blocks.0.fc2" if name == "vit" else "encoder.layers.0.linear2").out_features


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("name", ["vit", "encoder-padding"])
def test_every_criterion_scores_the_stream(name: str, criterion: str, tmp_path) -> None:
    make, data, _, _ = CASES[name]
    model, x = _build(make), data(32, seed=1)
    y = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(2))
    res = oamipc.compile(model, x[:2], data=(x, y), importance=criterion, prune_ratio=0.5, prune_embed=True,
                         reconstruct=False)
    rep = res.report
    width = _stream_width(res.module, name)
    assert width == E // 2 and rep["settings"]["prune_embed"] is True
    pos = res.module.pos_embed if name == "vit" else res.module.pos
    assert pos.shape[-1] == width and res.module.get_submodule("head").in_features == width
    assert rep["after"]["macs"] == pytest.approx(rep["prune"]["predicted_macs_after"])
    assert rep["after"]["macs"] == count_costs(res.module).macs
    path = tmp_path / "pruned.onnx"
    export_onnx(res.module, (x[:2],), path)
    verify_onnx(path, res.module, x)


def test_token_embedding_loses_columns_and_exports(tmp_path) -> None:
    make, data, _, by_hand = CASES["tokens-padding"]
    model, x = _build(make), data(16, seed=1)
    res = oamipc.compile(model, x[:2], importance="l1", prune_ratio=0.25, prune_embed=True)
    emb = res.module.get_submodule("embed")
    assert isinstance(emb, nn.Embedding) and emb.weight.shape == (VOCAB, E - E // 4)
    path = tmp_path / "tokens.onnx"
    export_onnx(res.module, (x[:2],), path)
    verify_onnx(path, res.module, x)


def test_a_plan_made_with_prune_embed_replays_with_it() -> None:
    model, x = _build(_vit), _images(8)
    made = oamipc.compile(model, x[:2], importance="l2", prune_ratio=0.5, prune_embed=True)
    assert made.plan is not None and made.plan.settings["prune_embed"] is True
    replayed = oamipc.compile(model, x[:2], plan=made.plan)
    assert _stream_width(replayed.module, "vit") == E // 2
    with torch.no_grad():
        torch.testing.assert_close(replayed.module(x), made.module(x))


def test_pipeline_takes_prune_embed() -> None:
    model, x = _build(_vit), _images(4)
    res = oamipc.compile(model, x[:2], pipeline="prune-units{importance=l1,prune-ratio=0.5,prune-embed=true}")
    assert _stream_width(res.module, "vit") == E // 2
    with pytest.raises(oamipc.errors.UsageError, match="prune-embed"):
        oamipc.compile(model, x[:2], pipeline="prune-units{importance=l1,prune-ratio=0.5}", prune_embed=True)


def test_reconstruction_refits_around_the_pruned_stream(tmp_path) -> None:
    """Reconstruction refits the layers after the narrower stream (the LayerNorms are not refit: they
    have no least-squares form) and brings the logits closer to the dense ones; the patch embedding,
    upstream of every removed unit, keeps its dense outputs and is left alone."""
    model, x = _build(_vit), _images(64, seed=1)
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    res = oamipc.compile(model, x[:2], data=(x, y), importance="l1", prune_ratio=0.5, prune_embed=True)
    rec = res.report["reconstruct"]
    refit = {f["name"] for f in rec["layers"] if f["refit"]}
    assert {"blocks.0.attn.q", "blocks.0.fc1", "blocks.1.fc2", "head"} <= refit and "patch_embed" not in refit
    assert rec["output_error_after"] < rec["output_error_before"]
    path = tmp_path / "rebuilt.onnx"
    export_onnx(res.module, (x[:2],), path)
    verify_onnx(path, res.module, x)


def test_mip_plans_the_stream(tmp_path) -> None:
    """The stream group has no exact MILP encoding (attention, LayerNorm): it goes through the
    joint stage's measured flips, and the report says so."""
    torch.manual_seed(0)
    model = oamipc.models.ViT(dim=8, depth=1, heads=2, mlp=16).eval()
    x = _images(32, seed=1)
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2))
    res = oamipc.compile(model, x[:2], data=(x, y), importance="mip", flops_budget=0.5, prune_embed=True,
                         reconstruct=False, mip_options={"time_limit": 5, "total_time_limit": 20})
    rep = res.report
    assert rep["after"]["macs"] <= 0.5 * rep["before"]["macs"] + 1e-6
    assert rep["after"]["macs"] == count_costs(res.module).macs
    assert res.module.get_submodule("blocks.0.fc2").out_features == res.module.pos_embed.shape[-1]
    stages = rep["mip"]["stages"]
    assert "patch_embed (+2 coupled)" in stages["layer_subproblems_without_encoding"] and stages["joint_rounds"] > 0
    path = tmp_path / "mip.onnx"
    export_onnx(res.module, (x[:2],), path)
    verify_onnx(path, res.module, x)
