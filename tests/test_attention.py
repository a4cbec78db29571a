"""Attention and transformer layers: traced through, heads and FFN units pruned, outputs checked.

Oracles: PyTorch's own modules (the stand-ins of :mod:`oamipc.attention` compute what
``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers compute, masks included; a network
with heads and FFN units removed computes what the original computes once the output projection's
columns of those heads and the FFN output layer's columns of those units are zeroed), and
onnxruntime (the exported file computes what the pruned module computes).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oamipc
import oamipc.models
from oamipc.attention import TracedMultiheadAttention, swap_known_modules
from oamipc.export import export_onnx, verify_onnx
from oamipc.passes import count_costs
from oamipc.passes.unit_groups import UnitGroupAnalysis
from oamipc.surgery import apply_plan
from oamipc.tracing import trace
from oamipc.units import UnitGraph

E, H, FFN, SEQ = 16, 4, 32, 6
CRITERIA = ["l1", "l2", "activation", "taylor", "random"]


def _run(module: nn.Module, *args: object, **kwargs: object) -> object:
    with torch.no_grad():
        return module(*args, **kwargs)


# ------------------------------------------------------------------------------------------
# Test networks
# ------------------------------------------------------------------------------------------


class EncoderNet(nn.Module):
    """Linear embedding -> nn.TransformerEncoder -> mean over tokens -> classifier.

    ``mask``: none, a causal mask (a buffer), or a key padding mask computed from the input
    (tokens whose features are all zero are padding).
    """

    def __init__(self, *, batch_first: bool = True, norm_first: bool = False, activation: str = "relu",
                 mask: str = "none", layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, E)
        layer = nn.TransformerEncoderLayer(E, H, FFN, dropout=0.1, batch_first=batch_first, norm_first=norm_first,
                                           activation=activation)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(E), enable_nested_tensor=False)
        self.head = nn.Linear(E, 5)
        self.batch_first = batch_first
        self.mask = mask
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(SEQ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, SEQ, 8)
        h = self.embed(x)
        h = h if self.batch_first else h.transpose(0, 1)
        if self.mask == "causal":
            h = self.encoder(h, mask=self.causal, is_causal=True)
        elif self.mask == "padding":
            h = self.encoder(h, src_key_padding_mask=x.abs().sum(-1) == 0)
        else:
            h = self.encoder(h)
        return self.head(h.mean(1 if self.batch_first else 0))


class Seq2Seq(nn.Module):
    """An encoder and a pre-norm decoder (causal self-attention, cross-attention on the encoder's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.src, self.tgt = nn.Linear(8, E), nn.Linear(8, E)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, FFN, batch_first=True), 1)
        layer = nn.TransformerDecoderLayer(E, H, FFN, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(E, 5)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(SEQ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(self.src(x))
        return self.head(self.decoder(self.tgt(x), memory, tgt_mask=self.causal, tgt_is_causal=True)[:, -1])


class AttentionNet(nn.Module):
    """One nn.MultiheadAttention (self- or cross-attention) in a residual block, then a classifier."""

    def __init__(self, *, batch_first: bool = True, packed: bool = True, need_weights: bool = False,
                 cross: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(8, E)
        self.memory = nn.Linear(8, 12)
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=None if packed else 12,
                                          vdim=None if packed else 12)
        self.head = nn.Linear(E, 5)
        self.batch_first, self.need_weights, self.cross, self.packed = batch_first, need_weights, cross, packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        m = self.memory(x) if not self.packed else h
        if not self.batch_first:
            h, m = h.transpose(0, 1), m.transpose(0, 1)
        a, _ = self.attn(h, m, m, need_weights=self.need_weights)
        h = h + a
        return self.head(h.mean(1 if self.batch_first else 0))


class HandAttention(nn.Module):
    """Attention written out: q/k/v Linear, heads by view/permute, SDPA or softmax(QK^T)V."""

    def __init__(self, *, sdpa: bool = True, causal: bool = False, head_bias: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.sdpa, self.causal = sdpa, causal
        # A learned bias per head and position pair (as Swin's relative position bias).
        self.bias = nn.Parameter(torch.randn(1, H, SEQ, SEQ)) if head_bias else None
        self.register_buffer("allowed", torch.ones(SEQ, SEQ, dtype=torch.bool).tril())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, E // H).permute(0, 2, 1, 3)
        k = self.k(x).view(b, n, H, -1).transpose(1, 2)
        v = self.v(x).reshape(b, n, H, E // H).transpose(1, 2)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(E // H)
            if self.causal:
                scores = scores.masked_fill(~self.allowed, float("-inf"))
            if self.bias is not None:
                scores = scores + self.bias
            y = scores.softmax(dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, n, E))


class PackedHandAttention(nn.Module):
    """One Linear for q, k and v, cut by ``chunk``; heads by view/transpose; SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (qkv[i].view(b, n, H, E // H).transpose(1, 2) for i in range(3))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, E))


class HandNet(nn.Module):
    def __init__(self, packed: bool = False, **kwargs: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(8, E)
        self.attn = PackedHandAttention() if packed else HandAttention(**kwargs)
        self.norm = nn.LayerNorm(E)
        self.fc1, self.fc2 = nn.Linear(E, FFN), nn.Linear(FFN, E)
        self.head = nn.Linear(E, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(self.norm(h))
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))


def _input(n: int = 4, seed: int = 0, padded: bool = False) -> torch.Tensor:
    x = torch.randn(n, SEQ, 8, generator=torch.Generator().manual_seed(seed))
    if padded:
        for i in range(n):
            x[i, SEQ - 1 - i % 3:] = 0  # the last 0-2 tokens of each sequence are padding
    return x


def _build(cls: type[nn.Module], seed: int = 0, **kwargs: object) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kwargs).eval()


# ------------------------------------------------------------------------------------------
# The stand-ins compute what torch's modules compute
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch_first", "bias", "separate", "need_weights"),
                         list(itertools.product([True, False], repeat=4)))
def test_multihead_stand_in_matches_torch(batch_first: bool, bias: bool, separate: bool, need_weights: bool) -> None:
    torch.manual_seed(0)
    b, length, source = 3, 5, 6
    kdim = 8 if separate else E
    mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    stand_in = swap_known_modules(mha)
    assert isinstance(stand_in, TracedMultiheadAttention)

    def seq(n: int, width: int) -> torch.Tensor:
        return torch.randn(b, n, width) if batch_first else torch.randn(n, b, width)

    q, k, v = seq(length, E), seq(source, kdim), seq(source, kdim)
    padding = torch.zeros(b, source, dtype=torch.bool)
    padding[1, 4:] = True
    masks = [{}, {"attn_mask": torch.rand(length, source) < 0.3}, {"attn_mask": torch.randn(length, source)},
             {"attn_mask": torch.randn(b * H, length, source)}, {"key_padding_mask": padding},
             {"key_padding_mask": padding, "attn_mask": torch.ones(length, source, dtype=torch.bool).triu(1)}]
    for mask, average in itertools.product(masks, [True, False]):
        want = _run(mha, q, k, v, need_weights=need_weights, average_attn_weights=average, **mask)
        got = _run(stand_in, q, k, v, need_weights=need_weights, average_attn_weights=average, **mask)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        if need_weights:
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
        else:
            assert got[1] is None
    for module in (mha, stand_in):  # a causal hint without its mask is refused by both
        with pytest.raises(RuntimeError, match="is_causal"):
            _run(module, q, k, v, need_weights=need_weights, is_causal=True)


@pytest.mark.parametrize(("batch_first", "norm_first", "activation"),
                         list(itertools.product([True, False], [True, False], ["relu", "gelu"])))
def test_encoder_stand_in_matches_torch(batch_first: bool, norm_first: bool, activation: str) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, FFN, batch_first=batch_first, norm_first=norm_first,
                                       activation=activation)
    with pytest.warns(UserWarning) if norm_first else _no_warning():
        encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E)).eval()
    x = torch.randn(3, SEQ, E) if batch_first else torch.randn(SEQ, 3, E)
    padding = torch.zeros(3, SEQ, dtype=torch.bool)
    padding[1, 4:] = True
    padding[2, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(SEQ)
    stand_in = swap_known_modules(encoder)
    # With a padding mask alone torch takes its nested-tensor path where it can (padded outputs 0).
    for mask in [{}, {"src_key_padding_mask": padding}, {"mask": causal, "is_causal": True},
                 {"mask": causal, "src_key_padding_mask": padding}]:
        torch.testing.assert_close(_run(stand_in, x, **mask), _run(encoder, x, **mask), rtol=1e-5, atol=1e-5)
    traced = trace(encoder, (x,))
    torch.testing.assert_close(_run(traced, x), _run(encoder, x), rtol=1e-5, atol=1e-5)


class _no_warning:  # noqa: N801 - used like pytest.warns
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_stand_in_matches_torch(norm_first: bool) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, FFN, batch_first=True, norm_first=norm_first)
    decoder = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(E)).eval()
    tgt, memory = torch.randn(3, SEQ, E), torch.randn(3, 4, E)
    causal = nn.Transformer.generate_square_subsequent_mask(SEQ)
    stand_in = swap_known_modules(decoder)
    for mask in [{}, {"tgt_mask": causal, "tgt_is_causal": True},
                 {"memory_key_padding_mask": torch.tensor([[False] * 4, [False, False, True, True], [False] * 4])}]:
        torch.testing.assert_close(_run(stand_in, tgt, memory, **mask), _run(decoder, tgt, memory, **mask),
                                   rtol=1e-5, atol=1e-5)


def test_swap_leaves_the_model_and_leaf_modules_alone() -> None:
    model = _build(EncoderNet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swapped = swap_known_modules(model)
    assert isinstance(model.encoder, nn.TransformerEncoder)
    assert type(swapped.encoder).__name__ == "TracedEncoder"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert swap_known_modules(model, frozenset({"encoder"})) is model
    # Unsupported options stay torch's module (opaque).
    odd = nn.MultiheadAttention(E, H, add_bias_kv=True)
    assert swap_known_modules(odd) is odd


# ------------------------------------------------------------------------------------------
# Unit groups: heads and FFN units
# ------------------------------------------------------------------------------------------


def _units(model: nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, UnitGraph]:
    gm = trace(model, (x,))
    return gm, UnitGroupAnalysis().run(gm, None)  # type: ignore[arg-type]  # needs no manager


def _head_units(graph: UnitGraph, q_proj: str, head_dim: int) -> list[int]:
    """Unit of each head of the attention whose query projection is ``q_proj``, in head order."""
    by_channel = {ch: u for u, members in graph.members.items() for t, ch in members if t == q_proj}
    heads = [by_channel[h * head_dim] for h in range(len(by_channel) // head_dim)]
    for h, u in enumerate(heads):  # every channel of a head is that head's unit
        assert {by_channel[h * head_dim + i] for i in range(head_dim)} == {u}
    return heads


def _producer_units(graph: UnitGraph, target: str) -> list[int]:
    return [u for u, members in sorted(graph.members.items()) if any(t == target for t, _ in members)]


@pytest.mark.parametrize("model", [
    pytest.param(lambda: _build(EncoderNet), id="encoder"),
    pytest.param(lambda: _build(EncoderNet, batch_first=False, mask="causal"), id="encoder-seq-first-causal"),
    pytest.param(lambda: _build(EncoderNet, norm_first=True, mask="padding", activation="gelu"), id="encoder-padding"),
    pytest.param(lambda: _build(AttentionNet, packed=False, batch_first=False), id="mha-separate"),
    pytest.param(lambda: _build(AttentionNet, need_weights=True), id="mha-weights"),
    pytest.param(lambda: _build(HandNet), id="hand-sdpa"),
    pytest.param(lambda: _build(HandNet, sdpa=False, causal=True), id="hand-softmax-causal"),
])
def test_heads_and_ffn_units_are_prunable_groups(model) -> None:
    net = model()
    gm, graph = _units(net, _input(padded=True))
    pinned = graph.pinned_mask()
    q_projs = [t for t in (layer.target for layer in graph.layers) if t.endswith("q_proj") or t.endswith(".q")]
    assert q_projs
    for q in q_projs:
        heads = _head_units(graph, q, E // H)
        assert len(heads) == H and not pinned[heads].any()
        v = q[: -len("q_proj")] + "v_proj" if q.endswith("q_proj") else q[:-1] + "v"
        assert set(_producer_units(graph, v)) == set(heads)  # q, k and v of a head are one unit
    for ffn in [t for t in (layer.target for layer in graph.layers) if t.endswith("linear1") or t.endswith("fc1")]:
        units = _producer_units(graph, ffn)
        assert len(units) == FFN and not pinned[units].any()


def test_a_per_head_bias_keeps_every_head(tmp_path) -> None:
    model = _build(HandNet, sdpa=False, head_bias=True)
    gm, graph = _units(model, _input())
    heads = _head_units(graph, "attn.q", E // H)
    assert graph.pinned_mask()[heads].all()
    x = _input(16, seed=1)
    res = oamipc.compile(model, x[:2], data=(x, torch.zeros(16, dtype=torch.long)), importance="l1", prune_ratio=0.5)
    assert res.module.get_submodule("attn.q").out_features == E
    assert res.module.get_submodule("fc1").out_features == FFN // 2
    path = tmp_path / "biased.onnx"
    export_onnx(res.module, (x[:2],), path)
    verify_onnx(path, res.module, x)


def _zeroed_oracle(model: nn.Module, drop_heads: dict[str, list[int]], drop_ffn: dict[str, list[int]]) -> nn.Module:
    """The original network with the removed heads' and FFN units' contributions zeroed."""
    oracle = __import__("copy").deepcopy(model)
    with torch.no_grad():
        for path, heads in drop_heads.items():
            out = oracle.get_submodule(path)
            out = out.out_proj if isinstance(out, nn.MultiheadAttention) else out.o
            d = E // H
            for h in heads:
                out.weight[:, h * d:(h + 1) * d] = 0
        for path, units in drop_ffn.items():
            oracle.get_submodule(path).weight[:, units] = 0
    return oracle


@pytest.mark.parametrize(("name", "make"), [
    ("encoder", lambda: _build(EncoderNet)),
    ("encoder-seq-first-padding", lambda: _build(EncoderNet, batch_first=False, mask="padding")),
    ("encoder-causal-prenorm", lambda: _build(EncoderNet, mask="causal", norm_first=True)),
    ("mha-separate", lambda: _build(AttentionNet, packed=False)),
    ("mha-weights-seq-first", lambda: _build(AttentionNet, need_weights=True, batch_first=False)),
    ("hand-softmax-causal", lambda: _build(HandNet, sdpa=False, causal=True)),
    ("hand-sdpa", lambda: _build(HandNet)),
    ("hand-packed", lambda: _build(HandNet, packed=True)),
])
def test_removed_heads_compute_what_zeroed_heads_compute(name: str, make, tmp_path) -> None:
    model = make()
    x = _input(8, seed=3, padded=True)
    gm, graph = _units(model, _input(padded=True))
    kept = graph.all_kept()
    drop_heads: dict[str, list[int]] = {}
    drop_ffn: dict[str, list[int]] = {}
    rng = np.random.default_rng(0)
    for layer in graph.layers:
        t = layer.target
        if t.endswith("q_proj") or t.endswith("attn.q") or t.endswith("attn.qkv"):
            heads = _head_units(graph, t, E // H)[:H]  # a packed qkv layer: its q part
            drop = sorted(rng.choice(H, size=2, replace=False).tolist())
            kept[[heads[h] for h in drop]] = False
            owner = t.rsplit(".", 1)[0]
            drop_heads[owner] = drop
        elif t.endswith("linear1") or t.endswith("fc1"):
            units = _producer_units(graph, t)
            drop = sorted(rng.choice(len(units), size=FFN // 2, replace=False).tolist())
            kept[[units[i] for i in drop]] = False
            drop_ffn[t.replace("linear1", "linear2").replace("fc1", "fc2")] = drop
    assert drop_heads
    apply_plan(gm, graph, kept)
    want = _run(_zeroed_oracle(model, drop_heads, drop_ffn), x)
    torch.testing.assert_close(_run(gm, x), want, rtol=1e-4, atol=1e-5)
    # The heads are gone from the weights, not masked.
    for owner in drop_heads:
        if name == "hand-packed":
            assert gm.get_submodule(f"{owner}.qkv").out_features == 3 * (H - 2) * (E // H)
            continue
        for proj in ("q", "k", "v") if name.startswith("hand") else ("q_proj", "k_proj", "v_proj"):
            assert gm.get_submodule(f"{owner}.{proj}").out_features == (H - 2) * (E // H)
    path = tmp_path / f"{name}.onnx"
    export_onnx(gm, (x[:2],), path)
    verify_onnx(path, gm, x)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize(("name", "make"), [
    ("encoder", lambda: _build(EncoderNet)),
    ("encoder-seq-first-causal", lambda: _build(EncoderNet, batch_first=False, mask="causal")),
    ("mha-separate", lambda: _build(AttentionNet, packed=False)),
    ("hand-softmax", lambda: _build(HandNet, sdpa=False)),
    ("hand-packed", lambda: _build(HandNet, packed=True)),
    ("seq2seq", lambda: _build(Seq2Seq)),
])
def test_compile_prunes_heads_and_exports(name: str, make, criterion: str, tmp_path) -> None:
    model = make()
    x = _input(32, seed=1, padded=True)
    y = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(2))
    res = oamipc.compile(model, x[:2], data=(x, y), importance=criterion, prune_ratio=0.5)
    rep = res.report
    assert rep["after"]["macs"] < rep["before"]["macs"]
    assert rep["after"]["macs"] == pytest.approx(rep["prune"]["predicted_macs_after"])
    assert rep["after"]["macs"] == count_costs(res.module).macs
    q_projs = [n for n, m in res.module.named_modules() if n.endswith(("q_proj", "attn.q", "attn.qkv"))]
    widths = [res.module.get_submodule(n).out_features // (3 if n.endswith("qkv") else 1) for n in q_projs]
    assert widths and all(w < E and w % (E // H) == 0 for w in widths)  # whole heads went
    path = tmp_path / "pruned.onnx"
    export_onnx(res.module, (x[:2],), path)
    verify_onnx(path, res.module, x)


def test_vit_prunes_heads_and_mlp_units_and_keeps_the_stream(tmp_path) -> None:
    torch.manual_seed(0)
    model = oamipc.models.ViT(dim=32, depth=2, heads=4, mlp=64).eval()
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    gm, graph = _units(model, x[:2])
    for block in ("blocks.0", "blocks.1"):
        heads = _head_units(graph, f"{block}.attn.q", 8)
        assert len(heads) == 4 and not graph.pinned_mask()[heads].any()
    res = oamipc.compile(model, x[:2], data=(x, y), importance="l1", prune_ratio=0.5)
    for block in ("blocks.0", "blocks.1"):
        for proj in ("q", "k", "v"):
            assert res.module.get_submodule(f"{block}.attn.{proj}").out_features == 16  # 2 heads of 8
        assert res.module.get_submodule(f"{block}.attn.proj").in_features == 16
        assert res.module.get_submodule(f"{block}.fc1").out_features == 32
        assert res.module.get_submodule(f"{block}.fc2").out_features == 32  # the residual stream stays
    path = tmp_path / "vit.onnx"
    export_onnx(res.module, (x[:2],), path)
    verify_onnx(path, res.module, x)


def test_mip_prunes_whole_heads(tmp_path) -> None:
    model = _build(HandNet)
    x = _input(64, seed=1)
    y = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(2))
    res = oamipc.compile(model, x[:2], data=(x, y), importance="mip", prune_ratio=0.5)
    assert res.module.get_submodule("attn.q").out_features == E // 2  # 2 of the 4 heads
    assert res.module.get_submodule("attn.o").in_features == E // 2
    assert res.report["after"]["macs"] == count_costs(res.module).macs
    path = tmp_path / "mip.onnx"
    export_onnx(res.module, (x[:2],), path)
    verify_onnx(path, res.module, x)


# ------------------------------------------------------------------------------------------
# Mask buffers sized at run time
# ------------------------------------------------------------------------------------------


class CausalBufferAttention(nn.Module):
    """Causal self-attention in the common GPT style: one packed qkv Linear cut by ``split``, and a
    causal-mask buffer built for ``max_len`` tokens, sliced to the input's length at run time."""

    def __init__(self, max_len: int = 8, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.dim, self.heads = dim, heads
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.size(0), x.size(1)
        q, k, v = self.qkv(x).split(self.dim, dim=2)
        q, k, v = (z.view(b, t, self.heads, self.dim // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.dim // self.heads))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(b, t, self.dim)
        return self.head(self.proj(y).mean(1))


def test_a_causal_mask_buffer_sliced_at_run_time_traces_and_loses_whole_heads(tmp_path) -> None:
    """``self.bias[:, :, :t, :t]`` with ``t = x.size(1)`` failed to trace (the buffer was a plain
    tensor, sliced by a traced size); now it is a graph value.  Removing head 1 gives the original
    with that head's q, k and v rows of the packed Linear zeroed, and onnxruntime agrees."""
    torch.manual_seed(0)
    model = CausalBufferAttention().eval()
    x = torch.randn(3, 6, 8)
    gm = trace(model, (x,))
    graph = UnitGroupAnalysis().run(gm, oamipc.passmanager.AnalysisManager(oamipc.passmanager.CompileContext((x,))))
    head1 = next(u for u in range(graph.n_units) if ("qkv", 4) in graph.members[u])
    assert set(graph.members[head1]) == {("qkv", c) for c in (4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23)}
    kept = graph.all_kept()
    kept[head1] = False
    result = oamipc.compile(model, (x,), plan=oamipc.Plan.from_mask(graph, kept, "test"))
    assert result.module.get_submodule("qkv").out_features == 12
    assert result.module.get_submodule("proj").in_features == 4
    ref = CausalBufferAttention().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        rows = [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
        ref.qkv.weight[rows] = 0.0
        ref.qkv.bias[rows] = 0.0
    torch.testing.assert_close(_run(result.module, x), _run(ref, x))
    path = tmp_path / "causal.onnx"
    export_onnx(result.module, (x,), path)
    assert verify_onnx(path, result.module, (x,)).passed


class _RuntimeWidthAttention(nn.Module):
    """nanoGPT's spelling: one packed q/k/v Linear, and the merge back to (B, T, C) with ``C`` read
    from the input's size at run time, a size the surgery cannot shrink."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(width, 3 * width), nn.Linear(width, width), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class _RuntimeWidthNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.attn = nn.Linear(8, 32), _RuntimeWidthAttention()
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))


def test_a_width_read_at_run_time_keeps_the_heads_and_the_rest_still_prunes(tmp_path) -> None:
    """Before: the plan removed heads and shape propagation then failed at the ``view(b, t, c)``.
    Now that view is a barrier with a reason that says how to write it, the heads stay, the FFN
    units still go, and the file matches PyTorch."""
    torch.manual_seed(0)
    model = _RuntimeWidthNet().eval()
    x = torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(1))
    gm, graph = _units(model, x[:2])
    reasons = [b.reason for b in graph.barriers]
    assert any("read at run time" in r for r in reasons), reasons
    res = oamipc.compile(model, x[:2], importance="l1", prune_ratio=0.5)
    assert res.module.get_submodule("attn.qkv").out_features == 96
    assert res.module.get_submodule("fc1").out_features == 32
    path = tmp_path / "runtime_width.onnx"
    export_onnx(res.module, (x[:2],), path)
    verify_onnx(path, res.module, x)
