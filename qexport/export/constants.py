"""The ``qexport`` functions' constants as ONNX inputs, and back: one codec per constants class.

Each ONNX function call (:mod:`qexport.export.functions`) takes its folded kernel constants
(:mod:`qexport.ops.kernels`) as int32 initializer inputs after the data input ``x``.
:func:`to_onnx_inputs` writes them (the exporter), :func:`from_onnx_inputs` reads them back (the
ORT rewrites, tests) and returns None for arrays that are not a consistent schedule of the class,
so a reader can keep a call it does not recognise. Shifts travel as powers of two (and their
halves, the rounding terms): a shift is a division by a Gather-free constant in the function body.

===============  ==========================================================================
function         inputs after ``x``
===============  ==========================================================================
``Requant``      bound, half_pre, pow2_pre, m, half_post, pow2_post, qmax (vectors: per channel)
``ISoftmax``     pow2_pre, ln2, b, c, e, out_max
``IGelu``        in_max, half_pre, pow2_pre, clip, one, half_shift, pow2_shift, one_s
``ITanh``        in_max, pow2_pre, ln2, b, c, e, one, out_max
``ILayerNorm``   n, n // 2, keep, gamma, beta, then the 7 ``Requant`` inputs of ``out``
===============  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar, overload

import numpy as np

from qexport.ops import kernels as K
from qexport.ops.intmath import POW2_MAX_EXP

Consts = (K.RequantParams | K.ChannelRequant | K.ExpConsts | K.SoftmaxConsts | K.GeluConsts | K.TanhConsts
          | K.LayerNormConsts)
T = TypeVar("T", K.RequantParams, K.ChannelRequant, K.ExpConsts, K.SoftmaxConsts, K.GeluConsts,
            K.TanhConsts, K.LayerNormConsts)

#: The constants class of each ``qexport`` function (``Requant`` reads as per channel).
FUNCTION_CONSTS: dict[str, type] = {
    "Requant": K.ChannelRequant,
    "ISoftmax": K.SoftmaxConsts,
    "IGelu": K.GeluConsts,
    "ITanh": K.TanhConsts,
    "ILayerNorm": K.LayerNormConsts,
}


def _i32(v: Any) -> np.ndarray:
    return np.asarray(v, dtype=np.int32)


def to_onnx_inputs(c: Consts) -> list[np.ndarray]:
    """The int32 arrays a function call takes after ``x`` (see the module docstring)."""
    if isinstance(c, K.RequantParams):
        vals: list[Any] = [c.bound, (1 << c.pre) >> 1, 1 << c.pre, c.m, (1 << c.post) >> 1, 1 << c.post,
                           c.qmax]
    elif isinstance(c, K.ChannelRequant):
        vals = [list(c.bound), c.half_pre(), [1 << x for x in c.pre], list(c.m), c.half_post(),
                [1 << x for x in c.post], c.qmax]
    elif isinstance(c, K.ExpConsts):
        vals = [1 << c.pre, c.ln2, c.b, c.c, c.e]
    elif isinstance(c, K.SoftmaxConsts):
        return [*to_onnx_inputs(c.exp), _i32(c.out_max)]
    elif isinstance(c, K.GeluConsts):
        vals = [c.in_max, (1 << c.pre) >> 1, 1 << c.pre, c.clip, c.one, (1 << c.shift) >> 1, 1 << c.shift,
                c.one_s]
    elif isinstance(c, K.TanhConsts):
        return [_i32(c.in_max), *to_onnx_inputs(c.exp), _i32(c.one), _i32(c.out_max)]
    elif isinstance(c, K.LayerNormConsts):
        head = [_i32(v) for v in (c.n, c.n // 2, c.keep, list(c.gamma), list(c.beta))]
        return head + to_onnx_inputs(c.out)
    else:
        raise TypeError(f"no ONNX codec for {type(c).__name__}")
    return [_i32(v) for v in vals]


# --------------------------------------------------------------------------- reading back


def _log2_exact(v: int) -> int | None:
    return v.bit_length() - 1 if v > 0 and v & (v - 1) == 0 else None


def _int_arrays(arrs: Sequence[np.ndarray], n: int) -> list[np.ndarray] | None:
    out = [np.asarray(a) for a in arrs]
    if len(out) != n or any(a.dtype.kind not in "iu" or a.ndim > 1 for a in out):
        return None
    return out


def _scalars(arrs: Sequence[np.ndarray], n: int) -> list[int] | None:
    out = _int_arrays(arrs, n)
    if out is None or any(a.size != 1 for a in out):
        return None
    return [int(a.reshape(-1)[0]) for a in out]


def _pow2_pair(half: int, pow2: int) -> int | None:
    """The shift ``s`` of a ``(2**s >> 1, 2**s)`` pair, None unless consistent."""
    s = _log2_exact(pow2)
    return s if s is not None and half == (1 << s) >> 1 else None


def _channel_requant(arrs: Sequence[np.ndarray]) -> K.ChannelRequant | None:
    got = _int_arrays(arrs, 7)
    if got is None or got[6].size != 1:
        return None
    vecs = [[int(x) for x in a.reshape(-1)] for a in got[:6]]
    c = max(len(v) for v in vecs)
    if c == 0 or any(len(v) not in (1, c) for v in vecs):
        return None
    bound, half_pre, pow2_pre, m, half_post, pow2_post = (v * c if len(v) == 1 else v for v in vecs)
    pre = [_pow2_pair(h, p) for h, p in zip(half_pre, pow2_pre, strict=True)]
    post = [_pow2_pair(h, p) for h, p in zip(half_post, pow2_post, strict=True)]
    qmax = int(got[6].reshape(-1)[0])
    bits = (qmax + 1).bit_length()
    if any(p is None for p in pre + post) or qmax < 1 or _log2_exact(qmax + 1) is None:
        return None
    if min(bound) < 0 or min(m) <= 0:
        return None
    return K.ChannelRequant(m=tuple(m), bound=tuple(bound), pre=tuple(int(p or 0) for p in pre),
                            post=tuple(int(p or 0) for p in post), bits=bits)


def _exp(arrs: Sequence[np.ndarray]) -> K.ExpConsts | None:
    v = _scalars(arrs, 5)
    if v is None:
        return None
    pow2_pre, ln2, b, c, e = v
    pre = _log2_exact(pow2_pre)
    if pre is None or ln2 < 1 or b < 0 or c < 0 or not 0 <= e <= POW2_MAX_EXP:
        return None
    return K.ExpConsts(pre=pre, ln2=ln2, b=b, c=c, e=e)


@overload
def from_onnx_inputs(cls: type[T], arrs: Sequence[np.ndarray]) -> T | None: ...
@overload
def from_onnx_inputs(cls: type, arrs: Sequence[np.ndarray]) -> Any: ...
def from_onnx_inputs(cls: type, arrs: Sequence[np.ndarray]) -> Any:
    """The ``cls`` constants that :func:`to_onnx_inputs` wrote as ``arrs``; None when ``arrs`` are not
    such a schedule (wrong count, non-integer, a shift that is not a power of two, ...).

    ``ChannelRequant`` also reads per-tensor arrays (one channel); ``RequantParams`` needs them."""
    if cls is K.ChannelRequant:
        return _channel_requant(arrs)
    if cls is K.RequantParams:
        cr = _channel_requant(arrs)
        if cr is None or len(cr.m) != 1 or any(np.asarray(a).size != 1 for a in arrs):
            return None
        return K.RequantParams(m=cr.m[0], shift=cr.pre[0] + cr.post[0], bits=cr.bits, bound=cr.bound[0],
                               pre=cr.pre[0])
    if cls is K.ExpConsts:
        return _exp(arrs)
    if cls is K.SoftmaxConsts:
        ec, om = _exp(arrs[:5]), _scalars(arrs[5:], 1)
        return None if ec is None or om is None or om[0] < 1 else K.SoftmaxConsts(exp=ec, out_max=om[0])
    if cls is K.GeluConsts:
        v = _scalars(arrs, 8)
        if v is None:
            return None
        in_max, half_pre, pow2_pre, clip, one, half_shift, pow2_shift, one_s = v
        pre, shift = _pow2_pair(half_pre, pow2_pre), _pow2_pair(half_shift, pow2_shift)
        if pre is None or shift is None:
            return None
        return K.GeluConsts(pre=pre, clip=clip, one=one, shift=shift, one_s=one_s, in_max=in_max)
    if cls is K.TanhConsts:
        v = _scalars(arrs, 8)
        ec = _exp(arrs[1:6]) if v is not None else None
        if v is None or ec is None:
            return None
        return K.TanhConsts(exp=ec, one=v[6], out_max=v[7], in_max=v[0])
    if cls is K.LayerNormConsts:
        head = _scalars(arrs[:3], 3)
        vecs = _int_arrays(arrs[3:5], 2)
        out = _channel_requant(arrs[5:])
        if head is None or vecs is None or out is None or len(arrs) != 12:
            return None
        n, half_n, keep = head
        gamma, beta = ([int(x) for x in a.reshape(-1)] for a in vecs)
        if n < 1 or half_n != n // 2 or keep < 0:
            return None
        return K.LayerNormConsts(n=n, keep=keep, gamma=tuple(gamma), beta=tuple(beta), out=out)
    raise TypeError(f"no ONNX codec for {cls.__name__}")
