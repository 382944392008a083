"""The pure-integer reference model: a BERT/RoBERTa classifier over frozen integer params.

Built from a checkpoint (or from a QAT model through :func:`qexport.quant.freeze`)
and nothing else: no float weights. With the ``full`` preset every step
between the token ids and ``logits_int`` is integer arithmetic from
:mod:`qexport.ops` (int64 tensors holding int32 values); presets that keep a
part in float run that part as ``dequantize -> float op -> quantize``.

The ONNX exporter mirrors :meth:`IntegerModel.forward` node for node; the
``site`` names below are the names of the captured intermediates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qexport.errors import CheckpointError
from qexport.ops import kernels as K
from qexport.ops.intmath import qmax
from qexport.quant.freeze import LINEARS, PROB_SCALE
from qexport.quant.packing import unpack
from qexport.quant.presets import get_preset

#: Bits of the wide intermediates (residual sums, GELU and tanh inputs).
WIDE_BITS = 16


@dataclass
class Linear:
    w_t: torch.Tensor  # [in, out] int64 (int8 values)
    b: torch.Tensor  # [out] int64 (int32 values)
    ws: torch.Tensor  # [out] float64 per-channel weight scale


class IntegerModel:
    """Integer-only forward of a quantized encoder classifier. See module docstring."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.meta = meta
        self.preset = get_preset(meta["preset"])
        self.arch: str = meta["arch"]
        self.num_layers = int(meta["num_layers"])
        self.hidden = int(meta["hidden_size"])
        self.heads = int(meta["num_heads"])
        self.head_dim = self.hidden // self.heads
        self.pad_token_id = int(meta.get("pad_token_id") or 0)
        self.eps = float(meta.get("layer_norm_eps", 1e-12))
        self.t = tensors
        self.path: Path | None = None
        shapes = meta["weight_shapes"]
        wbits = meta["weight_bits"]

        def weight(key: str) -> torch.Tensor:
            n = shapes[key][-1]
            return unpack(tensors[key + ".w"], int(wbits[key]), n).to(torch.int64)

        def s(key: str) -> float:
            return float(tensors[key])

        self.s = s
        self.emb = {k: weight(f"emb.{k}") for k in ("word", "pos", "tt")}
        self.lin: dict[str, Linear] = {}
        names = [f"l{i}.{n}" for i in range(self.num_layers) for n in LINEARS] + ["pool", "cls"]
        for key in names:
            self.lin[key] = Linear(
                w_t=weight(key).t().contiguous(),
                b=tensors[key + ".b"].to(torch.int64),
                ws=tensors[key + ".ws"].double(),
            )
        self.consts = self._fold()

    # ------------------------------------------------------------------ constants
    def _fold(self) -> dict[str, Any]:
        """Every integer constant of the graph, computed once from the scales."""
        s, t = self.s, self.t
        C: dict[str, Any] = {}
        s_e = s("emb.ln.in_s")
        for k in ("word", "pos", "tt"):
            C[f"emb.{k}.rq"] = K.requant_from_ratio(s(f"emb.{k}.s") / s_e, WIDE_BITS)
        C["emb.ln"] = self._ln_consts("emb.ln")
        s_h = s("emb.ln.out_s")
        for i in range(self.num_layers):
            p = f"l{i}"
            for n in ("q", "k", "v"):
                C[f"{p}.{n}.rq"] = self._lin_rq(f"{p}.{n}", s_h, s(f"{p}.{n}.out_s"), 8)
            s_sc = s(f"{p}.q.out_s") * s(f"{p}.k.out_s") / math.sqrt(self.head_dim)
            C[f"{p}.scores_s"] = s_sc
            C[f"{p}.softmax"] = K.softmax_constants(s_sc, 8)
            C[f"{p}.ctx.rq"] = K.requant_from_ratio(s(f"{p}.v.out_s") * PROB_SCALE / s(f"{p}.ctx_s"), 8)
            s_r1 = s(f"{p}.ln1.in_s")
            C[f"{p}.o.rq"] = self._lin_rq(f"{p}.o", s(f"{p}.ctx_s"), s_r1, WIDE_BITS)
            C[f"{p}.res1.rq"] = K.requant_from_ratio(s_h / s_r1, WIDE_BITS)
            C[f"{p}.ln1"] = self._ln_consts(f"{p}.ln1")
            s_h1 = s(f"{p}.ln1.out_s")
            s_gi = s(f"{p}.gelu.in_s")
            C[f"{p}.f1.rq"] = self._lin_rq(f"{p}.f1", s_h1, s_gi, WIDE_BITS)
            gc = K.gelu_constants(s_gi)
            C[f"{p}.gelu"] = gc
            C[f"{p}.gelu.rq"] = K.requant_from_ratio(K.gelu_out_scale(s_gi, gc) / s(f"{p}.gelu.out_s"), 8)
            s_r2 = s(f"{p}.ln2.in_s")
            C[f"{p}.f2.rq"] = self._lin_rq(f"{p}.f2", s(f"{p}.gelu.out_s"), s_r2, WIDE_BITS)
            C[f"{p}.res2.rq"] = K.requant_from_ratio(s_h1 / s_r2, WIDE_BITS)
            C[f"{p}.ln2"] = self._ln_consts(f"{p}.ln2")
            s_h = s(f"{p}.ln2.out_s")
        C["pool.rq"] = self._lin_rq("pool", s_h, s("tanh.in_s"), WIDE_BITS)
        C["tanh"] = K.tanh_constants(s("tanh.in_s"))
        C["logits_scale"] = float(t["cls.ws"][0]) * PROB_SCALE
        return C

    def _lin_rq(self, key: str, s_in: float, s_out: float, bits: int) -> K.ChannelRequant:
        ratios = (self.lin[key].ws * s_in / s_out).tolist()
        return K.ChannelRequant.from_ratios(ratios, bits)

    def _ln_consts(self, key: str) -> K.LayerNormConsts:
        return K.layernorm_constants(self.t[key + ".g"], self.t[key + ".b"], self.s(key + ".out_s"), 8)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str | Path) -> IntegerModel:
        from qexport.quant.checkpoint import load_checkpoint

        tensors, manifest = load_checkpoint(Path(path))
        try:
            m = cls(tensors, manifest)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {path} is inconsistent: {exc}") from None
        m.path = Path(path)
        return m

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> IntegerModel:
        from qexport.quant.freeze import freeze

        return cls(*freeze(model))

    @property
    def logits_scale(self) -> float:
        return float(self.consts["logits_scale"])

    # ------------------------------------------------------------------ ops
    def linear(self, x: torch.Tensor, key: str) -> torch.Tensor:
        lin = self.lin[key]
        return K.int_matmul(x, lin.w_t) + lin.b

    def layernorm(self, x: torch.Tensor, key: str) -> torch.Tensor:
        if self.preset.layernorm:
            return K.i_layernorm_int(x, self.consts[key])
        xf = x.float() * self.s(key + ".in_s")
        y = F.layer_norm(xf, (self.hidden,), self.t[key + ".g"], self.t[key + ".b"], self.eps)
        return K.quantize(y, 8, self.s(key + ".out_s"))

    def softmax(self, scores: torch.Tensor, layer: str) -> torch.Tensor:
        if self.preset.softmax:
            return K.i_softmax_int(scores, self.consts[f"{layer}.softmax"])
        p = torch.softmax(scores.float() * self.consts[f"{layer}.scores_s"], dim=-1)
        return torch.round(p * qmax(8)).to(torch.int64)

    def gelu(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        if self.preset.gelu:
            y = K.i_gelu_int(x, self.consts[f"{layer}.gelu"])
            return K.requantize_int(y, self.consts[f"{layer}.gelu.rq"])
        y = F.gelu(x.float() * self.s(f"{layer}.gelu.in_s"))
        return K.quantize(y, 8, self.s(f"{layer}.gelu.out_s"))

    def tanh(self, x: torch.Tensor) -> torch.Tensor:
        if self.preset.tanh:
            return K.i_tanh_int(x, self.consts["tanh"])
        y = torch.tanh(x.float() * self.s("tanh.in_s"))
        return K.quantize(y, 8, PROB_SCALE)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.arch == "roberta":  # HF create_position_ids_from_input_ids
            mask = (input_ids != self.pad_token_id).to(torch.int64)
            return torch.cumsum(mask, dim=1) * mask + self.pad_token_id
        return torch.arange(input_ids.shape[1], dtype=torch.int64).expand_as(input_ids)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        capture: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``logits_int`` (int64 tensor of int32 values); real logits = ``logits_int * logits_scale``."""
        ids = torch.as_tensor(input_ids).to(torch.int64)
        if ids.dim() != 2:
            raise ValueError("input_ids must be [batch, seq]")
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).long()
        if ids.shape[1] > int(self.meta["max_position_embeddings"]) - (self.pad_token_id + 1) * (
            self.arch == "roberta"
        ):
            raise ValueError(f"sequence length {ids.shape[1]} exceeds the model's maximum")
        C = self.consts
        cap = capture if capture is not None else {}
        B, T = ids.shape
        rq = K.requantize_int
        e = (
            rq(self.emb["word"][ids], C["emb.word.rq"])
            + rq(self.emb["pos"][self.position_ids(ids)], C["emb.pos.rq"])
            + rq(self.emb["tt"][torch.zeros_like(ids)], C["emb.tt.rq"])
        )
        cap["emb.sum"] = e
        h = self.layernorm(e, "emb.ln")
        cap["emb.ln"] = h
        keep = (mask > 0).view(B, 1, 1, T)
        for i in range(self.num_layers):
            p = f"l{i}"

            def heads(x: torch.Tensor) -> torch.Tensor:
                return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)

            q = heads(K.requantize_channels(self.linear(h, f"{p}.q"), C[f"{p}.q.rq"]))
            k = heads(K.requantize_channels(self.linear(h, f"{p}.k"), C[f"{p}.k.rq"]))
            v = heads(K.requantize_channels(self.linear(h, f"{p}.v"), C[f"{p}.v.rq"]))
            cap[f"{p}.q"], cap[f"{p}.k"], cap[f"{p}.v"] = q, k, v
            scores = K.int_matmul(q, k.transpose(2, 3))
            scores = torch.where(keep, scores, torch.full_like(scores, -K.MASK_FILL))
            cap[f"{p}.scores"] = scores
            probs = self.softmax(scores, p)
            cap[f"{p}.probs"] = probs
            ctx = rq(K.int_matmul(probs, v), C[f"{p}.ctx.rq"])
            ctx = ctx.transpose(1, 2).reshape(B, T, self.hidden)
            cap[f"{p}.ctx"] = ctx
            r1 = K.requantize_channels(self.linear(ctx, f"{p}.o"), C[f"{p}.o.rq"]) + rq(h, C[f"{p}.res1.rq"])
            cap[f"{p}.res1"] = r1
            h1 = self.layernorm(r1, f"{p}.ln1")
            cap[f"{p}.ln1"] = h1
            f = K.requantize_channels(self.linear(h1, f"{p}.f1"), C[f"{p}.f1.rq"])
            cap[f"{p}.f1"] = f
            g = self.gelu(f, p)
            cap[f"{p}.gelu"] = g
            r2 = K.requantize_channels(self.linear(g, f"{p}.f2"), C[f"{p}.f2.rq"]) + rq(h1, C[f"{p}.res2.rq"])
            cap[f"{p}.res2"] = r2
            h = self.layernorm(r2, f"{p}.ln2")
            cap[f"{p}.ln2"] = h
        pooled = self.tanh(K.requantize_channels(self.linear(h[:, 0], "pool"), C["pool.rq"]))
        cap["pooled"] = pooled
        logits = self.linear(pooled, "cls")
        cap["logits_int"] = logits
        return logits

    __call__ = forward

    def predict(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(input_ids, attention_mask).argmax(-1)
