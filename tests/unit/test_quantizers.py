"""Weight quantizers, layer groups, precision schedules and the distillation loss (all CPU, small)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from qexport.errors import ConfigError
from qexport.quant.groups import (
    apply_weight_quantization,
    group_table,
    last_linear_name,
    parse_groups,
    resolve_groups,
    set_quant_enabled,
    set_weight_quant,
)
from qexport.quant.modules import QuantAct, QuantLinear, fake_quant, weight_scale
from qexport.quant.quantizers import (
    BinaryQuantizer,
    IdentityQuantizer,
    IRNetQuantizer,
    LSQQuantizer,
    MinMaxQuantizer,
    PACTQuantizer,
    PluggableQuantEmbedding,
    PluggableQuantLinear,
    TernaryQuantizer,
    WeightQuantizer,
    ede_t_k,
    make_quantizer,
    quant_param_groups,
    sign_ede,
    sign_ste,
)
from qexport.train.distill import DistillLoss, layer_map, soft_cross_entropy
from qexport.train.schedules import (
    CyclicPrecision,
    EDESchedule,
    FixedPrecision,
    LatentSchedule,
    QuantController,
    parse_bit_schedule,
)


def _w(rows: int = 4, cols: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.1


def _grad(q: torch.nn.Module, w: torch.Tensor, upstream: torch.Tensor | None = None) -> torch.Tensor:
    w = w.clone().requires_grad_(True)
    out = q(w)
    out.backward(torch.ones_like(out) if upstream is None else upstream)
    assert w.grad is not None
    return w.grad


# --------------------------------------------------------------------------- min/max (I-BERT)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("per_channel", [True, False])
def test_minmax_matches_lead_fake_quant(bits: int, per_channel: bool) -> None:
    w = _w()
    s = weight_scale(w, bits, per_channel)
    ref = fake_quant(w, s.unsqueeze(1) if per_channel else s, bits)
    q = MinMaxQuantizer(bits, per_channel, rows=4)
    assert torch.equal(q(w), ref)
    levels = torch.unique(torch.round(q(w) / (s.unsqueeze(1) if per_channel else s)))
    assert levels.abs().max() <= 2 ** (bits - 1) - 1


def test_minmax_ste_identity_inside_zero_outside_with_ema_range() -> None:
    q = MinMaxQuantizer(4, per_channel=False, momentum=0.9)
    q.train()
    q(torch.full((2, 3), 0.5))  # EMA range initialised to 0.5
    q.eval()
    w = torch.tensor([[0.1, -0.2, 0.45], [0.7, -0.9, 0.3]])
    g = _grad(q, w)
    assert torch.equal(g, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]))
    # without EMA the range is the weight's own max: nothing is clipped
    assert torch.equal(_grad(MinMaxQuantizer(4, per_channel=True, rows=2), w), torch.ones_like(w))


# --------------------------------------------------------------------------- PACT


def test_pact_forward_and_ste_gradients() -> None:
    q = PACTQuantizer(bits=4, init=0.5)
    w = torch.tensor([[-0.9, -0.5001, -0.2, 0.0, 0.1, 0.3, 0.4999, 0.6, 2.0]])
    out = q(w)
    s = 0.5 / 7
    assert torch.allclose(out, torch.round(w.clamp(-0.5, 0.5) / s) * s)
    up = torch.arange(1.0, 10.0).reshape(1, -1)  # distinct upstream gradients
    wg = w.clone().requires_grad_(True)
    q(wg).backward(up)
    assert wg.grad is not None
    inside = (w.abs() < 0.5).float()
    assert torch.allclose(wg.grad, up * inside)  # identity inside [-alpha, alpha], 0 outside
    # paper (eq. 3), symmetric: d w_q / d alpha = +1 (w > alpha), -1 (w < -alpha), 0 inside
    expect = up[w > 0.5].sum() - up[w < -0.5].sum()
    assert q.alpha.grad is not None
    assert torch.allclose(q.alpha.grad, expect)


def test_pact_per_channel_alpha_gradient() -> None:
    q = PACTQuantizer(bits=8, init=0.25, per_channel=True, rows=2)
    w = torch.tensor([[0.3, 0.1, -0.4], [-0.3, 0.2, 0.26]])
    q(w).sum().backward()
    assert q.alpha.grad is not None
    assert torch.equal(q.alpha.grad, torch.tensor([0.0, 0.0]))  # row 0: +1 - 1; row 1: -1 + 1
    q.alpha.grad = None
    q(torch.tensor([[0.3, 0.5, 0.0], [-0.3, 0.0, 0.0]])).sum().backward()
    assert torch.equal(q.alpha.grad, torch.tensor([2.0, -1.0]))


def test_pact_param_group_hints_seed003() -> None:
    lin = torch.nn.Linear(8, 4)
    q = make_quantizer("pact", 4, lin.weight)
    assert isinstance(q, PACTQuantizer) and q.alpha.shape == () and float(q.alpha.detach()) == 1.0
    assert q.param_hints() == {"alpha": {"lr_scale": 1000.0, "weight_decay": 0.5}}
    model = torch.nn.Sequential(PluggableQuantLinear.wrap(lin, q))
    groups = quant_param_groups(model, lr=2e-5, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    special = [g for g in groups if g["name"].startswith("quant")]
    assert len(special) == 1 and special[0]["params"] == [q.alpha]
    assert special[0]["lr"] == pytest.approx(2e-2) and special[0]["weight_decay"] == 0.5
    assert by_name["weights"]["params"] == [lin.weight] and by_name["no_decay"]["params"] == [lin.bias]
    torch.optim.AdamW(groups)  # a valid optimizer spec


# --------------------------------------------------------------------------- LSQ


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_step_gradient_matches_paper(symmetric: bool) -> None:
    bits = 3
    q = LSQQuantizer(bits, symmetric=symmetric)
    qn = 3 if symmetric else 4
    qp = 3
    with torch.no_grad():
        q.step.fill_(0.1)
    w = torch.tensor([[-0.55, -0.37, -0.12, 0.0, 0.04, 0.16, 0.26, 0.33, 0.61]])
    up = torch.linspace(0.5, 2.0, 9).reshape(1, -1)
    wg = w.clone().requires_grad_(True)
    out = q(wg)
    out.backward(up)
    v = w / 0.1
    inside = (v > -qn) & (v < qp)
    clip = torch.where(v <= -qn, torch.tensor(-qn * 1.0), torch.tensor(qp * 1.0))
    d = torch.where(inside, -v + torch.round(v), clip)
    g = 1.0 / math.sqrt(w.numel() * qp)
    assert q.step.grad is not None
    assert torch.allclose(q.step.grad, (up * d).sum() * g, atol=1e-6)
    assert torch.equal(wg.grad, up * inside.float())
    assert torch.allclose(out, torch.round(v.clamp(-qn, qp)) * 0.1)


def test_lsq_per_channel_gradient_scale_and_init() -> None:
    w = _w(3, 32)
    q = make_quantizer("lsq", 4, w, per_channel=True)
    assert isinstance(q, LSQQuantizer)
    assert torch.allclose(q.step, 2 * w.abs().mean(dim=1) / math.sqrt(7))
    assert q.grad_factor(w) == pytest.approx(1 / math.sqrt(32 * 7))
    q(w).sum().backward()
    v = w / q.step.detach().unsqueeze(1)
    d = torch.where(v.abs() < 7, torch.round(v) - v, torch.sign(v) * 7).sum(dim=1)
    assert torch.allclose(q.step.grad, d * q.grad_factor(w), atol=1e-6)


# --------------------------------------------------------------------------- binary / IR-Net


def test_binary_sign_times_mean_abs_per_row() -> None:
    w = torch.tensor([[0.2, -0.4, 0.0, 0.6], [-1.0, -2.0, 3.0, 0.5]])
    q = BinaryQuantizer(per_channel=True)
    out = q(w)
    alpha = torch.tensor([0.3, 1.625])
    assert torch.allclose(out, torch.tensor([[1.0, -1.0, 1.0, 1.0], [-1.0, -1.0, 1.0, 1.0]]) * alpha[:, None])
    qt, s = q.int_repr(w)
    assert set(qt.unique().tolist()) == {-1, 1} and torch.allclose(s, alpha)
    assert torch.allclose(BinaryQuantizer(per_channel=False)(w).abs(), w.abs().mean().expand_as(w))


def test_sign_ste_clipped_identity() -> None:
    x = torch.tensor([-1.5, -1.0, -0.3, 0.0, 0.7, 1.2], requires_grad=True)
    sign_ste(x, 1.0).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))


def test_irnet_balanced_weights_zero_mean_unit_std() -> None:
    w = _w(5, 64) + torch.linspace(-1, 1, 5)[:, None]  # rows with different means
    q = IRNetQuantizer(per_channel=True)
    b = q.balance(w)
    assert torch.allclose(b.mean(dim=1), torch.zeros(5), atol=1e-6)
    assert torch.allclose(b.std(dim=1), torch.ones(5), atol=1e-5)
    out = q(w)
    c = w - w.mean(dim=1, keepdim=True)
    assert torch.allclose(out, torch.where(c >= 0, 1.0, -1.0) * c.abs().mean(dim=1, keepdim=True))
    qt, s = q.int_repr(w)
    assert torch.allclose(qt.float() * s[:, None], out)


def test_irnet_ede_backward_and_schedule() -> None:
    x = torch.linspace(-2, 2, 9, requires_grad=True)
    t, k = 0.5, 2.0
    sign_ede(x, t, k).sum().backward()
    assert torch.allclose(x.grad, k * t * (1 - torch.tanh(t * x.detach()) ** 2))
    assert ede_t_k(0.0) == pytest.approx((0.1, 10.0))
    assert ede_t_k(0.5) == pytest.approx((1.0, 1.0))
    assert ede_t_k(1.0) == pytest.approx((10.0, 1.0))
    sched = EDESchedule(total_steps=100)
    assert sched.t_k_at(0) == pytest.approx((0.1, 10.0)) and sched.t_k_at(100) == pytest.approx((10.0, 1.0))
    # the quantizer uses the EDE on the balanced weights
    q = IRNetQuantizer(per_channel=True)
    q.set_ede(t, k)
    w = _w(2, 8).requires_grad_(True)
    q(w).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


# --------------------------------------------------------------------------- ternary


def test_ternary_threshold_and_scale() -> None:
    w = torch.tensor([[0.1, -0.5, 1.0, -2.0, 0.05]])  # mean|w| = 0.73 -> delta = 0.511
    q = TernaryQuantizer(per_channel=True)
    delta, alpha, mask = q.delta_alpha(w)
    assert float(delta) == pytest.approx(0.7 * 0.73)
    assert mask.tolist() == [[False, False, True, True, False]]
    assert float(alpha) == pytest.approx(1.5)
    assert torch.allclose(q(w), torch.tensor([[0.0, 0.0, 1.5, -1.5, 0.0]]))
    assert torch.equal(_grad(q, w), torch.ones_like(w))  # straight-through
    qt, s = q.int_repr(w)
    assert qt.tolist() == [[0, 0, 1, -1, 0]] and q.storage_bits == 2


# --------------------------------------------------------------------------- common contract


ALL_QUANTIZERS: list[tuple[str, int, dict[str, Any]]] = [
    ("minmax", 8, {}), ("minmax", 4, {}), ("pact", 4, {"init": 0.2}), ("lsq", 4, {}), ("lsq", 2, {}),
    ("binary", 1, {}), ("ir-net", 1, {}), ("ir-net", 1, {"scale": "pow2"}), ("ternary", 2, {}),
]


@pytest.mark.parametrize(("name", "bits", "kw"), ALL_QUANTIZERS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_int_repr_reproduces_forward(name: str, bits: int, kw: dict[str, Any], per_channel: bool) -> None:
    w = _w(6, 24, seed=3)
    q = make_quantizer(name, bits, w, per_channel=per_channel, **kw)
    q.eval()
    qi, s = q.int_repr(w)
    assert qi.dtype == torch.int64 and qi.shape == w.shape
    assert s.shape == ((6,) if per_channel else ())
    lim = 2 ** (q.storage_bits - 1)
    assert int(qi.min()) >= -lim and int(qi.max()) <= lim - 1
    assert torch.allclose(qi.float() * (s[:, None] if per_channel else s), q(w), rtol=0, atol=1e-7)
    q.enabled = False
    assert q(w) is w


def test_make_quantizer_rejects_bad_bits_and_names() -> None:
    w = _w()
    with pytest.raises(ConfigError, match="binary"):
        make_quantizer("minmax", 1, w)
    with pytest.raises(ConfigError):
        make_quantizer("binary", 4, w)
    with pytest.raises(ConfigError):
        make_quantizer("ternary", 4, w)
    with pytest.raises(ConfigError, match="unknown weight quantizer"):
        make_quantizer("dorefa", 4, w)
    with pytest.raises(ConfigError, match="bad option"):
        make_quantizer("minmax", 4, w, init=1.0)
    with pytest.raises(ConfigError):
        BinaryQuantizer().set_bits(4)


# --------------------------------------------------------------------------- layer groups on a tiny BERT


def tiny_bert(seed: int = 0) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_roberta(seed: int = 0) -> Any:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=70, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=1, type_vocab_size=1,
    )
    return RobertaForSequenceClassification(cfg).eval()


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


L = "bert.encoder.layer"


def test_groups_resolve_bert_module_names() -> None:
    m = tiny_bert()
    t = group_table(m)
    assert t["EMB"] == ["bert.embeddings.word_embeddings"]
    assert t["QKV"] == [f"{L}.{i}.attention.self.{n}" for i in range(2) for n in ("query", "key", "value")]
    assert t["FFN"] == [f"{L}.{i}.{n}.dense" for i in range(2) for n in ("intermediate", "output")]
    assert t["CLS"] == ["bert.pooler.dense", "classifier"]
    assert len(t["MHA"]) == 8 and f"{L}.1.attention.output.dense" in t["MHA"]
    assert resolve_groups(m, "CLS") == ["bert.pooler.dense"]  # keep_last drops the classifier
    assert resolve_groups(m, "CLS", keep_last=False) == ["bert.pooler.dense", "classifier"]
    all_qk = resolve_groups(m, "ALL_QK")
    assert not any(n.endswith("value") for n in all_qk)
    assert f"{L}.0.attention.self.query" in all_qk and f"{L}.0.attention.self.key" in all_qk
    assert len(resolve_groups(m, "ALL")) == len(all_qk) + 2
    union = resolve_groups(m, "FFN+EMB")
    assert union == ["bert.embeddings.word_embeddings", *t["FFN"]]  # model order
    assert resolve_groups(m, ["qkv", "QK"]) == t["QKV"]
    assert parse_groups("ffn + all_qk") == ["FFN", "ALL_QK"] and parse_groups("none") == []
    with pytest.raises(ConfigError, match="unknown layer group"):
        resolve_groups(m, "FFN+ATTN")


def test_groups_resolve_roberta_and_survive_quantize_model() -> None:
    from qexport.quant import quantize_model

    m = tiny_roberta()
    assert last_linear_name(m) == "classifier.out_proj"
    assert group_table(m)["CLS"] == ["classifier.dense", "classifier.out_proj"]
    before = resolve_groups(m, "ALL+EMB", keep_last=False)
    quantize_model(m)
    assert resolve_groups(m, "ALL+EMB", keep_last=False) == before
    assert resolve_groups(m, "CLS") == ["classifier.dense"]


def test_apply_minmax8_is_identical_to_lead_modules() -> None:
    from qexport.quant import quantize_model

    ref = tiny_bert()
    quantize_model(ref)
    m = tiny_bert()
    names = apply_weight_quantization(m, "ALL+EMB", "minmax", 8, "fully")
    assert "classifier" not in names and len(names) == 1 + 12 + 1
    mods = dict(m.named_modules())
    assert all(isinstance(mods[n], PluggableQuantLinear | PluggableQuantEmbedding) for n in names)
    assert not any(type(x) is QuantLinear for x in m.modules())  # the rest is pluggable too
    cls = mods["classifier"]
    assert isinstance(cls, PluggableQuantLinear) and not cls.weight_quantizer.per_channel
    b = _batch()
    ref.train(), m.train()
    assert torch.equal(ref(**b).logits, m(**b).logits)  # first pass initialises the EMA ranges
    ref.eval(), m.eval()
    assert torch.equal(ref(**b).logits, m(**b).logits)


def test_apply_freezes_with_lead_freeze() -> None:
    from qexport.quant import freeze, quantize_model

    ref = tiny_bert()
    quantize_model(ref)
    m = tiny_bert()
    apply_weight_quantization(m, "ALL", "minmax", 8)
    ref.train(), m.train()
    ref(**_batch()), m(**_batch())
    t_ref, _ = freeze(ref)
    t, meta = freeze(m)
    assert t.keys() == t_ref.keys() and all(torch.equal(t[k], t_ref[k]) for k in t)


@pytest.mark.parametrize(("name", "bits", "kw"), [
    ("minmax", 4, {}), ("pact", 4, {"init": 0.1}), ("lsq", 2, {}), ("binary", 1, {}),
    ("ir-net", 1, {}), ("ternary", 2, {}),
])
def test_apply_each_quantizer_trains(name: str, bits: int, kw: dict[str, Any]) -> None:
    m = tiny_bert()
    names = apply_weight_quantization(m, "ALL_QK+EMB", name, bits, "fully", **kw)
    m.train()
    out = m(**_batch(), labels=torch.tensor([0, 2]))
    out.loss.backward()
    mods = dict(m.named_modules())
    for n in names:
        mod = mods[n]
        assert mod.weight.grad is not None and torch.isfinite(mod.weight.grad).all(), n
        for p in mod.weight_quantizer.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert m.qexport_weight_quant["quantizer"] == name and m.qexport_weight_quant["bits"] == bits
    qw = mods[f"{L}.0.intermediate.dense"].quant_weight()
    assert torch.unique(qw[0]).numel() <= max(2 ** bits - 1, 2) + (1 if name == "lsq" else 0)


def test_basic_mode_observes_activations_without_quantizing() -> None:
    m = tiny_bert()
    apply_weight_quantization(m, "FFN", "minmax", 4, "basic")
    acts = [a for a in m.modules() if isinstance(a, QuantAct)]
    assert acts and not any(a.enabled for a in acts)
    m.train()
    m(**_batch())
    assert all(bool(a.initialized) for a in acts)  # ranges observed for a later switch/export
    apply_ffn = m.qexport_weight_quant
    assert apply_ffn["mode"] == "basic"
    set_quant_enabled(m, True)
    assert not any(a.enabled for a in acts)  # basic mode keeps activations float
    m2 = tiny_bert()
    apply_weight_quantization(m2, "FFN", "minmax", 4, "fully")
    assert all(a.enabled for a in m2.modules() if isinstance(a, QuantAct))


def test_research_path_fp_model_and_latent_switch() -> None:
    fp = tiny_bert()
    m = tiny_bert()
    names = apply_weight_quantization(m, "FFN", "binary", 1, "basic", preset="fp")
    assert not hasattr(m, "qexport_preset") or not m.qexport_preset.quantized
    assert sum(isinstance(x, PluggableQuantLinear) for x in m.modules()) == len(names) == 4
    assert isinstance(dict(m.named_modules())[f"{L}.0.attention.self.query"], torch.nn.Linear)
    b = _batch()
    assert not torch.allclose(m(**b).logits, fp(**b).logits)
    set_weight_quant(m, False)  # latent phase: exactly the float model
    assert torch.equal(m(**b).logits, fp(**b).logits)
    m3 = tiny_bert()
    apply_weight_quantization(m3, "FFN", "minmax", 8, "fully", preset="fp")
    lin = dict(m3.named_modules())[f"{L}.0.output.dense"]
    assert isinstance(lin, PluggableQuantLinear) and lin.in_act is not None and lin.in_act.bits == 8


def test_apply_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        apply_weight_quantization(tiny_bert(), "FFN", "minmax", 8, mode="half")
    with pytest.raises(ConfigError):
        apply_weight_quantization(tiny_bert(), "FFN", "kmeans", 8)
    with pytest.raises(ConfigError):
        apply_weight_quantization(tiny_bert(), "FFN", "minmax", 8, act_bits=4)


def test_rest_fp_trains_unselected_layers_in_float() -> None:
    m = tiny_bert()
    apply_weight_quantization(m, "FFN", "ternary", 2, rest="fp")
    q = dict(m.named_modules())[f"{L}.0.attention.self.query"]
    assert isinstance(q.weight_quantizer, IdentityQuantizer)
    assert torch.equal(q.quant_weight(), q.weight)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(("lo", "hi"), [(4, 8), (4, 16), (8, 16)])
@pytest.mark.parametrize("shape", ["cosine", "triangular"])
def test_cpt_hits_bounds_every_cycle(lo: int, hi: int, shape: str) -> None:
    total, cycles = 1000, 5
    s = CyclicPrecision(lo, hi, total, cycles, shape)
    period = total // cycles
    for c in range(cycles):
        bits = [s.bits_at(i) for i in range(c * period, (c + 1) * period)]
        assert min(bits) == lo and max(bits) == hi and bits[0] == lo
        if shape == "cosine":
            assert bits == sorted(bits)  # CPT's schedule rises within a cycle
        else:
            assert bits[period // 2] == hi and bits[-1] in (lo, lo + 1)
    assert s.bits_at(total) == s.eval_bits == hi
    assert CyclicPrecision(lo, hi, total, cycles, final_bits=lo).bits_at(total + 5) == lo


def test_cpt_cosine_formula_and_parsing() -> None:
    s = parse_bit_schedule("4-8", total_steps=400, num_cycles=2)
    assert isinstance(s, CyclicPrecision) and s.period == 200
    for step in (0, 37, 100, 150, 199, 250):
        f = (step % 200) / 200
        assert s.bits_at(step) == round(4 + 4 * 0.5 * (1 + math.cos(math.pi * f + math.pi)))
    fixed = parse_bit_schedule("16", 400)
    assert isinstance(fixed, FixedPrecision) and fixed.bits_at(123) == 16 == fixed.eval_bits
    for bad in ("8-4", "x", "4-8-16"):
        with pytest.raises(ConfigError):
            parse_bit_schedule(bad, 400)
    with pytest.raises(ConfigError):
        CyclicPrecision(4, 8, 100, shape="sawtooth")


def test_latent_schedule() -> None:
    lat = LatentSchedule.from_epochs(1, steps_per_epoch=30)
    assert lat.switch_step == 30
    assert [lat.quantized_at(s) for s in (0, 29, 30, 31)] == [False, False, True, True]


def test_controller_applies_latent_cpt_and_ede() -> None:
    m = tiny_bert()
    apply_weight_quantization(m, "FFN", "minmax", 8)
    ctl = QuantController(m, bits=CyclicPrecision(4, 8, 100, 2), latent=LatentSchedule(10))
    sel = [x.weight_quantizer for x in m.modules()
           if isinstance(x, PluggableQuantLinear) and x.weight_quantizer.selected]
    other = dict(m.named_modules())[f"{L}.0.attention.self.query"].weight_quantizer
    st = ctl.on_step(0)
    assert st == {"quantized": False, "weight_bits": 4}
    assert not any(q.enabled for q in sel) and not other.enabled
    assert not any(a.enabled for a in m.modules() if isinstance(a, QuantAct))
    st = ctl.on_step(49)
    assert st["quantized"] and st["weight_bits"] == 8 and all(q.enabled and q.bits == 8 for q in sel)
    assert other.bits == 8 and other.enabled
    assert all(a.enabled for a in m.modules() if isinstance(a, QuantAct))
    ctl.on_step(50)
    assert all(q.bits == 4 for q in sel) and other.bits == 8  # only the selected groups cycle
    assert ctl.on_eval()["weight_bits"] == 8
    m2 = tiny_bert()
    apply_weight_quantization(m2, "ALL", "ir-net", 1)
    QuantController(m2, ede=EDESchedule(100)).on_step(50)
    irs = [q for q in m2.modules() if isinstance(q, IRNetQuantizer)]
    assert irs and all(q.t == pytest.approx(1.0) and q.k == pytest.approx(1.0) for q in irs)


def test_controller_reinitialises_lsq_at_the_switch_only() -> None:
    m = tiny_bert()
    apply_weight_quantization(m, "FFN", "lsq", 4, preset="fp")  # LSQ: one step per layer
    lin = dict(m.named_modules())[f"{L}.0.intermediate.dense"]
    ctl = QuantController(m, latent=LatentSchedule(5))
    ctl.on_step(0)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # float phase moves the weights
    ctl.on_step(5)
    assert torch.allclose(lin.weight_quantizer.step, 2 * lin.weight.abs().mean() / math.sqrt(7))
    with torch.no_grad():
        lin.weight_quantizer.step.fill_(0.123)  # a trained/resumed step is kept
    QuantController(m, latent=LatentSchedule(5)).on_step(7)
    assert float(lin.weight_quantizer.step.detach()) == pytest.approx(0.123)


# --------------------------------------------------------------------------- distillation


def _fake_out(seed: int, layers: int = 2, b: int = 2, s: int = 5, h: int = 8) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "logits": torch.randn(b, 3, generator=g),
        "hidden_states": tuple(torch.randn(b, s, h, generator=g) for _ in range(layers + 1)),
        "attentions": tuple(torch.softmax(torch.randn(b, 2, s, s, generator=g), -1) for _ in range(layers)),
    }


def test_distill_parts_match_definitions() -> None:
    st, te = _fake_out(0), _fake_out(1)
    labels = torch.tensor([0, 2])
    loss, parts = DistillLoss({"logits": 1.0, "hidden": 0.5, "attention": 2.0, "ce": 0.3})(st, te, labels)
    logit = -(F.softmax(te["logits"], -1) * F.log_softmax(st["logits"], -1)).sum(-1).mean()
    hid = sum(F.mse_loss(a, b) for a, b in zip(st["hidden_states"], te["hidden_states"], strict=True))
    att = sum(F.mse_loss(a, b) for a, b in zip(st["attentions"], te["attentions"], strict=True))
    ce = F.cross_entropy(st["logits"], labels)
    assert parts["logits"] == pytest.approx(float(logit), rel=1e-6)
    assert parts["hidden"] == pytest.approx(float(hid), rel=1e-6)
    assert parts["attention"] == pytest.approx(float(att), rel=1e-6)
    assert parts["ce"] == pytest.approx(float(ce), rel=1e-6)
    total = logit + 0.5 * hid + 2.0 * att + 0.3 * ce
    assert float(loss) == pytest.approx(float(total), rel=1e-6)
    assert parts["total"] == pytest.approx(float(loss))


def test_distill_switchable_parts_and_temperature() -> None:
    st, te = _fake_out(0), _fake_out(1)
    only_logits = DistillLoss({"logits": 1.0, "hidden": 0.0, "attention": 0.0}, temperature=2.0)
    assert only_logits.forward_kwargs() == {"output_hidden_states": False, "output_attentions": False}
    loss, parts = only_logits({"logits": st["logits"]}, {"logits": te["logits"]})
    assert set(parts) == {"logits", "total"}
    assert float(loss) == pytest.approx(float(soft_cross_entropy(st["logits"], te["logits"], 2.0)))
    p = F.softmax(te["logits"] / 2, -1)
    assert float(loss) == pytest.approx(float(-(p * F.log_softmax(st["logits"] / 2, -1)).sum(-1).mean() * 4))
    with pytest.raises(ConfigError, match="output_hidden_states"):
        DistillLoss()({"logits": st["logits"]}, te)
    with pytest.raises(ConfigError, match="unknown distillation"):
        DistillLoss({"logit": 1.0})
    with pytest.raises(ConfigError):
        DistillLoss(temperature=0)


def test_distill_identical_outputs_and_gradients() -> None:
    te = _fake_out(1)
    st = {
        "logits": te["logits"].clone().requires_grad_(True),
        "hidden_states": tuple(x.clone().requires_grad_(True) for x in te["hidden_states"]),
        "attentions": tuple(x.clone().requires_grad_(True) for x in te["attentions"]),
    }
    loss, parts = DistillLoss()(st, te)
    assert parts["hidden"] == 0.0 and parts["attention"] == 0.0
    p = F.softmax(te["logits"], -1)
    assert parts["logits"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-6)  # entropy
    loss.backward()
    assert st["logits"].grad is not None and st["logits"].grad.abs().max() < 1e-6  # at the optimum
    st2 = _fake_out(0)
    st2["logits"].requires_grad_(True)
    te2 = _fake_out(1)
    te2["logits"].requires_grad_(True)
    DistillLoss({"hidden": 0, "attention": 0})(st2, te2)[0].backward()
    assert st2["logits"].grad is not None and te2["logits"].grad is None  # teacher detached


def test_distill_layer_mapping_and_mask() -> None:
    assert layer_map(2, 2) == [0, 1] and layer_map(2, 4) == [1, 3] and layer_map(3, 12) == [3, 7, 11]
    with pytest.raises(ConfigError):
        layer_map(3, 4)
    st, te = _fake_out(0, layers=2), _fake_out(1, layers=4)
    _, parts = DistillLoss({"logits": 0.0})(st, te)
    hid = sum(F.mse_loss(st["hidden_states"][i], te["hidden_states"][j]) for i, j in ((0, 0), (1, 2), (2, 4)))
    assert parts["hidden"] == pytest.approx(float(hid), rel=1e-6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    te_pad = {k: v for k, v in st.items()}
    te_pad["hidden_states"] = tuple(h.clone() for h in st["hidden_states"])
    for h in te_pad["hidden_states"]:
        h[0, 3:] += 5.0  # differences only at padded positions
    _, parts = DistillLoss({"logits": 0.0, "attention": 0.0})(st, te_pad, attention_mask=mask)
    assert parts["hidden"] == 0.0
    _, parts = DistillLoss({"logits": 0.0, "attention": 0.0})(st, te_pad)
    assert parts["hidden"] > 0.0


def test_distill_on_hf_outputs_quantized_student() -> None:
    teacher = tiny_bert()
    student = copy.deepcopy(teacher)
    apply_weight_quantization(student, "FFN", "ternary", 2)
    student.train()
    dl = DistillLoss({"logits": 1.0, "hidden": 1.0, "attention": 1.0, "ce": 1.0})
    b = _batch()
    with torch.no_grad():
        t_out = teacher(**b, **dl.forward_kwargs())
    s_out = student(**b, **dl.forward_kwargs())
    loss, parts = dl(s_out, t_out, labels=torch.tensor([1, 0]), attention_mask=b["attention_mask"])
    assert set(parts) == {"logits", "hidden", "attention", "ce", "total"}
    assert parts["hidden"] > 0 and parts["attention"] > 0 and math.isfinite(parts["total"])
    loss.backward()
    w = dict(student.named_modules())[f"{L}.0.intermediate.dense"].weight
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_weight_quantizer_base_is_abstract() -> None:
    q = WeightQuantizer(8, True)
    with pytest.raises(NotImplementedError):
        q(torch.zeros(1, 1))


def test_state_dict_roundtrip_restores_learned_quantizer_state() -> None:
    a, b = tiny_bert(), tiny_bert(seed=1)
    for m in (a, b):
        apply_weight_quantization(m, "FFN+QKV", "pact", 4, init=0.3)
    a.train()
    opt = torch.optim.AdamW(quant_param_groups(a, lr=1e-3))
    a(**_batch(), labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    keys = [k for k in a.state_dict() if k.endswith("weight_quantizer.alpha")]
    assert len(keys) == 10 and float(a.state_dict()[keys[0]]) != pytest.approx(0.3)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    assert torch.equal(a(**_batch()).logits, b(**_batch()).logits)
    c = copy.deepcopy(a)
    set_quant_enabled(c, False)  # acts observe-only via hooks on the copy, the original is untouched
    assert all(q.enabled for q in a.modules() if isinstance(q, WeightQuantizer))
    acts_c = [x for x in c.modules() if isinstance(x, QuantAct)]
    before = [float(x.running_max) for x in acts_c]
    c.train()
    c(**_batch(seed=5))
    assert not any(x.enabled for x in acts_c) and [float(x.running_max) for x in acts_c] != before
    assert all(x.enabled for x in a.modules() if isinstance(x, QuantAct))
