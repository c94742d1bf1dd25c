"""The per-layer input type: everything kobattr needs to know about one transformer layer.

Shape vocabulary used across kobattr:
    B batch, N tokens (query = key positions), H query heads, KV key/value heads,
    Dh head size, D d_model, F FFN width.

A layer has one of five block structures (``Layer.structure``; spec section 6), from ``placement``
and which norms it has (a norm may be LayerNorm or RMSNorm; ``None`` means no norm there):

    post       y = x + Attn(x) ;  h = LN1(y) ;  out = LN2(h + FF(h))          (BERT, RoBERTa, ELECTRA)
    pre        y = x + Attn(LN1(x)) ;  out = y + FF(LN2(y))                  (GPT-2, Llama, Qwen)
    sandwich   y = x + P1(Attn(LN1(x))) ;  out = y + P2(FF(LN2(y)))          (Gemma 2/3)
    post_only  y = x + P1(Attn(x)) ;  out = y + P2(FF(y))                    (OLMo 2)
    parallel   out = x + Attn(LN1(x)) + FF(LN2(x))                           (Pythia / GPT-NeoX)

P1 = ``attn_out_norm``, P2 = ``ffn_out_norm`` (both given with placement "pre": sandwich, or post_only
when ln1 and ln2 are None).

``Attn(.)_i = sum_j sum_h alpha^h_ij f^h(.)_j + b_O`` with ``f^h(z_j) = (z_j W_V^h + b_V^h) W_O^h``.
kobattr takes the value states ``v`` exactly as the model computes them (``b_V`` included, after
LN1 for pre-LN layers), so W_V and b_V are only needed by :meth:`Layer.from_weights`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor

NORM_KINDS = ("layernorm", "rmsnorm")
ELEMENTWISE_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")
ACTIVATIONS = ELEMENTWISE_ACTIVATIONS + GATED_ACTIVATIONS
PLACEMENTS = ("post", "pre", "parallel")
NORM_FIELDS = ("ln1", "ln2", "attn_out_norm", "ffn_out_norm")
STRUCTURE_NAMES = ("post", "pre", "sandwich", "post_only", "parallel")


class LayerInputError(ValueError):
    """A per-layer input that kobattr cannot attribute (bad shape, dtype, value or option)."""


def all_finite(t: Tensor) -> bool:
    """Whether every value of a floating tensor is finite, from one min/max reduction: NaN propagates through both
    and an infinity is an extreme, so no boolean copy of t is made (25x faster than isfinite(t).all() on the CPU)."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


@dataclass
class Norm:
    """LayerNorm or RMSNorm with optional affine weight (D,) and bias (D,)."""

    kind: str
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    eps: float = 1e-5

    def __call__(self, y: Tensor) -> Tensor:
        """The norm of the real input ``y`` (..., D), computed in y's dtype."""
        if self.kind == "layernorm":
            centred = y - y.mean(-1, keepdim=True)
        else:
            centred = y
        out = centred * self.inv_std(y).unsqueeze(-1)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return out

    def inv_std(self, y: Tensor) -> Tensor:
        """1 / s(y) per row (...,): population std (LayerNorm) or rms (RMSNorm), eps inside the root."""
        if self.kind == "layernorm":
            var = (y - y.mean(-1, keepdim=True)).pow(2).mean(-1)
        else:
            var = y.pow(2).mean(-1)
        return torch.rsqrt(var + self.eps)

    def split(self, part: Tensor) -> Tensor:
        """The row-independent part of g_i: centring (LayerNorm) and gamma, without 1/s(y_i)."""
        if self.kind == "layernorm":
            part = part - part.mean(-1, keepdim=True)
        if self.weight is not None:
            part = part * self.weight
        return part

    def bias_vector(self, d: int, like: Tensor) -> Tensor:
        return self.bias if self.bias is not None else like.new_zeros(d)


@dataclass
class FeedForward:
    """FF(z) = act(z W_in + b_in) W_out + b_out, or gated: (act(z W_gate + b_gate) * (z W_in + b_in)) W_out + b_out.

    w_in, w_gate: (D, F); w_out: (F, D). For Llama, w_in is up_proj and w_gate is gate_proj (transposed
    to (D, F)). ``activation`` is one of ACTIVATIONS: element-wise gelu (exact erf), gelu_tanh, relu,
    silu; gated swiglu (silu gate), geglu (erf gelu gate), geglu_tanh.
    """

    activation: str
    w_in: Tensor
    w_out: Tensor
    b_in: Optional[Tensor] = None
    b_out: Optional[Tensor] = None
    w_gate: Optional[Tensor] = None
    b_gate: Optional[Tensor] = None

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def base_activation(self) -> str:
        """The element-wise activation (of the gate, for a gated FFN)."""
        return {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}.get(self.activation, self.activation)

    def pre_activations(self, z: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(z W_in + b_in, z W_gate + b_gate or None) for input rows z (..., D)."""
        up = z @ self.w_in
        if self.b_in is not None:
            up = up + self.b_in
        gate = None
        if self.gated:
            gate = z @ self.w_gate
            if self.b_gate is not None:
                gate = gate + self.b_gate
        return up, gate

    def __call__(self, z: Tensor, block: int = 1 << 22) -> Tensor:
        """FF(z) for rows z (..., D), in row blocks of about ``block`` hidden units (no (N, F) temporaries)."""
        from .ig import activation_fn

        act = activation_fn(self.base_activation)
        rows = z.reshape(-1, z.shape[-1])
        out = rows.new_empty(rows.shape[0], self.w_out.shape[1])
        size = max(1, block // self.w_in.shape[1])
        for start in range(0, rows.shape[0], size):
            up, gate = self.pre_activations(rows[start:start + size])
            hidden = act(gate) * up if self.gated else act(up)
            out[start:start + size] = hidden @ self.w_out
        if self.b_out is not None:
            out += self.b_out
        return out.view(z.shape[:-1] + (self.w_out.shape[1],))


class AttentionShapes:
    """The shapes every attention block reads off its q (B, H, queries, Dh) and k (B, KV, keys, Dh), and its
    softmax scale (``scale``, None: Dh ** -0.5): shared by Layer and seq2seq.CrossAttention."""

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.q.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.q.shape[-1] ** -0.5


@dataclass
class Layer(AttentionShapes):
    """One transformer layer, described completely for attribution.

    Attention (as the model computes it):
        q: (B, H, N, Dh) queries, after RoPE if any.
        k: (B, KV, N, Dh) keys, after RoPE; H % KV == 0 and head h reads KV head h // (H // KV).
        v: (B, KV, N, Dh) value states with b_V included (for pre-LN: computed from LN1(x)).
        scale: the softmax scale (usually Dh ** -0.5).
        key_valid: (B, N) bool, False for padding tokens (no attribution to or from them).
        causal: a key j is visible to query i only if j <= i.
        window: sliding window; key j is visible to query i only if i - j < window (0 = no window).
        radius: symmetric window; key j is visible to query i only if |i - j| <= radius (0 = none).
        softcap: logit soft-capping (Gemma 2): alpha = softmax(c tanh(scale q.k / c)) (0 = none).
        w_o: (H, Dh, D) the output projection split per head; b_o: (D,) optional.
    Residual stream:
        x: (B, N, D) the layer input.
        placement: "post" (BERT), "pre" (GPT-2, Llama, and the sandwich / post_only structures) or
            "parallel" (GPT-NeoX); the module docstring lists the structures.
        ln1, ln2: post: the norms after the two residuals; pre and parallel: the norms before attention
            and before the FFN (None where there is none). ln1 before attention only matters for
            :meth:`forward` (v already includes it).
        attn_out_norm, ffn_out_norm: the norms after attention and after the FFN, before their residual.
        head_outputs: (B, H, N, Dh) optional, sum_j alpha^h_ij v_j as the model's attention computed it (before
            W_O); capture records it, so that kobattr need not recompute the attention output. The spot
            checks recompute from q, k and v, so a wrong one is caught.
        ffn: the feed-forward block.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    w_o: Tensor
    x: Tensor
    ln1: Optional[Norm]
    ln2: Optional[Norm]
    ffn: FeedForward
    placement: str = "post"
    scale: Optional[float] = None
    b_o: Optional[Tensor] = None
    key_valid: Optional[Tensor] = None
    causal: bool = False
    window: int = 0
    radius: int = 0
    softcap: float = 0.0
    attn_out_norm: Optional[Norm] = None
    ffn_out_norm: Optional[Norm] = None
    head_outputs: Optional[Tensor] = None

    # ------------------------------------------------------------------ shapes (batch, heads, scale: AttentionShapes)
    @property
    def seq_len(self) -> int:
        return self.q.shape[2]

    @property
    def d_model(self) -> int:
        return self.x.shape[-1]

    @property
    def structure(self) -> str:
        """The block structure (one of STRUCTURE_NAMES, see the module docstring); LayerInputError if the norms
        given fit none of them."""
        p1, p2 = self.attn_out_norm is not None, self.ffn_out_norm is not None
        if self.placement == "pre" and p1 and p2:
            if self.ln1 is None and self.ln2 is None:
                return "post_only"
            if self.ln2 is not None:
                return "sandwich"
            raise LayerInputError("a sandwich layer (norms after attention and FFN) needs ln2 before the FFN; "
                                  "with neither ln1 nor ln2 it is post_only (OLMo 2).")
        if p1 or p2:
            raise LayerInputError("norms after attention and after the FFN (attn_out_norm, ffn_out_norm) come together "
                                  "and only with placement 'pre' (sandwich or post_only); got "
                                  f"attn_out_norm={'a Norm' if p1 else None}, ffn_out_norm={'a Norm' if p2 else None}, "
                                  f"placement={self.placement!r}.")
        if self.placement == "post" and (self.ln1 is None or self.ln2 is None):
            raise LayerInputError("a post-LN layer needs both ln1 (after the attention residual) and ln2 (after the FFN residual).")
        if self.placement == "pre" and self.ln2 is None:
            raise LayerInputError("a pre-LN layer needs ln2 before the FFN (without any norm there it is not a structure kobattr knows).")
        return self.placement

    @property
    def valid(self) -> Tensor:
        """(B, N) bool key/query validity (all True without padding)."""
        if self.key_valid is None:
            return torch.ones(self.batch, self.seq_len, dtype=torch.bool, device=self.q.device)
        return self.key_valid

    @property
    def out_bias(self) -> Tensor:
        return self.b_o if self.b_o is not None else self.x.new_zeros(self.d_model)

    def to(self, dtype: Optional[torch.dtype] = None, device=None) -> "Layer":
        """A copy with every floating tensor (also in the norms and FFN) moved/cast."""

        def cast(t):
            if isinstance(t, Tensor) and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            if isinstance(t, Tensor):
                return t.to(device=device)
            if isinstance(t, (Norm, FeedForward)):
                return replace(t, **{f.name: cast(getattr(t, f.name)) for f in fields(t)})
            return t  # None (no norm), flags and numbers

        return replace(self, **{f.name: cast(getattr(self, f.name)) for f in fields(self)})

    def select(self, index: int) -> "Layer":
        """The layer of batch element ``index`` alone (batch dimension kept, of size 1)."""
        one = slice(index, index + 1)
        return replace(self, q=self.q[one], k=self.k[one], v=self.v[one], x=self.x[one],
                       key_valid=None if self.key_valid is None else self.key_valid[one],
                       head_outputs=None if self.head_outputs is None else self.head_outputs[one])

    # --------------------------------------------------------------- checking
    def validate(self) -> "Layer":
        """Raise LayerInputError with a sentence naming the problem, or return self."""
        q, k, v, x, w_o = self.q, self.k, self.v, self.x, self.w_o
        for name, t, nd in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("x", x, 3), ("w_o", w_o, 3)):
            if not isinstance(t, Tensor):
                raise LayerInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
            if t.dim() != nd:
                raise LayerInputError(f"{name} must have {nd} dimensions, got shape {tuple(t.shape)}.")
            if not t.is_floating_point():
                raise LayerInputError(f"{name} must be a floating tensor, got {t.dtype}.")
        B, H, N, Dh = q.shape
        if N == 0:
            raise LayerInputError("the sequence is empty (N = 0): there is nothing to attribute.")
        if B == 0:
            raise LayerInputError("the batch is empty (B = 0).")
        KV = k.shape[1]
        if k.shape != (B, KV, N, Dh):
            raise LayerInputError(f"k must be (B, KV, N, Dh) = ({B}, KV, {N}, {Dh}) to match q {tuple(q.shape)}, got {tuple(k.shape)}.")
        if v.shape != k.shape:
            raise LayerInputError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}.")
        if KV == 0 or H % KV:
            raise LayerInputError(f"the number of query heads ({H}) must be a multiple of the number of key/value heads ({KV}).")
        D = x.shape[-1]
        if x.shape != (B, N, D):
            raise LayerInputError(f"x must be (B, N, D) = ({B}, {N}, D), got {tuple(x.shape)}.")
        if w_o.shape != (H, Dh, D):
            raise LayerInputError(f"w_o must be (H, Dh, D) = ({H}, {Dh}, {D}), got {tuple(w_o.shape)}.")
        if self.placement not in PLACEMENTS:
            raise LayerInputError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}.")
        dtypes = {q.dtype, k.dtype, v.dtype, x.dtype, w_o.dtype}
        if len(dtypes) != 1:
            raise LayerInputError(f"q, k, v, x and w_o must share one dtype, got {sorted(map(str, dtypes))}.")
        devices = {t.device for t in (q, k, v, x, w_o)}
        if len(devices) != 1:
            raise LayerInputError(f"q, k, v, x and w_o must be on one device, got {sorted(map(str, devices))}.")
        self._check_vector("b_o", self.b_o, (D,))
        if self.head_outputs is not None:
            if not isinstance(self.head_outputs, Tensor) or self.head_outputs.shape != q.shape:
                got = tuple(self.head_outputs.shape) if isinstance(self.head_outputs, Tensor) else type(self.head_outputs).__name__
                raise LayerInputError(f"head_outputs must be (B, H, N, Dh) = {tuple(q.shape)} like q, got {got}.")
            if self.head_outputs.device != q.device or not self.head_outputs.is_floating_point():
                raise LayerInputError(f"head_outputs must be a floating tensor on {q.device}, got {self.head_outputs.dtype} "
                                      f"on {self.head_outputs.device}.")
        for name in NORM_FIELDS:
            norm = getattr(self, name)
            if norm is None:
                continue
            if not isinstance(norm, Norm) or norm.kind not in NORM_KINDS:
                raise LayerInputError(f"{name} must be None or a Norm with kind in {NORM_KINDS}.")
            self._check_vector(f"{name}.weight", norm.weight, (D,))
            self._check_vector(f"{name}.bias", norm.bias, (D,))
            if not norm.eps >= 0:
                raise LayerInputError(f"{name}.eps must be >= 0, got {norm.eps}.")
        ff = self.ffn
        if not isinstance(ff, FeedForward) or ff.activation not in ACTIVATIONS:
            raise LayerInputError(f"ffn must be a FeedForward with activation in {ACTIVATIONS}.")
        if ff.w_in.dim() != 2 or ff.w_in.shape[0] != D:
            raise LayerInputError(f"ffn.w_in must be (D, F) with D = {D}, got {tuple(ff.w_in.shape)}.")
        F_ = ff.w_in.shape[1]
        if ff.w_out.shape != (F_, D):
            raise LayerInputError(f"ffn.w_out must be (F, D) = ({F_}, {D}), got {tuple(ff.w_out.shape)}.")
        if ff.gated:
            if ff.w_gate is None or ff.w_gate.shape != (D, F_):
                got = None if ff.w_gate is None else tuple(ff.w_gate.shape)
                raise LayerInputError(f"a gated FFN ({ff.activation}) needs w_gate of shape (D, F) = ({D}, {F_}), got {got}.")
        elif ff.w_gate is not None:
            raise LayerInputError(f"w_gate is given but activation {ff.activation!r} is not gated; use one of {GATED_ACTIVATIONS}.")
        self._check_vector("ffn.b_in", ff.b_in, (F_,))
        self._check_vector("ffn.b_gate", ff.b_gate, (F_,))
        self._check_vector("ffn.b_out", ff.b_out, (D,))
        if self.key_valid is not None:
            if self.key_valid.shape != (B, N) or self.key_valid.dtype != torch.bool:
                raise LayerInputError(f"key_valid must be a bool tensor of shape (B, N) = ({B}, {N}), got {self.key_valid.dtype} {tuple(self.key_valid.shape)}.")
        if not isinstance(self.window, int) or self.window < 0:
            raise LayerInputError(f"window must be an int >= 0 (0 = no sliding window), got {self.window!r}.")
        if not isinstance(self.radius, int) or self.radius < 0:
            raise LayerInputError(f"radius must be an int >= 0 (0 = no symmetric window), got {self.radius!r}.")
        if not (isinstance(self.softcap, (int, float)) and math.isfinite(self.softcap) and self.softcap >= 0):
            raise LayerInputError(f"softcap must be a finite number >= 0 (0 = no logit soft-capping), got {self.softcap!r}.")
        self.structure  # raises for norms that fit no structure
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise LayerInputError(f"scale must be a finite positive number, got {self.scale}.")
        for name, t in self._tensors():
            if t.is_floating_point() and not all_finite(t):
                raise LayerInputError(f"{name} contains NaN or inf values; attributions of non-finite activations are meaningless.")
        return self

    def _check_vector(self, name, t, shape):
        if t is None:
            return
        if tuple(t.shape) != shape:
            raise LayerInputError(f"{name} must have shape {shape}, got {tuple(t.shape)}.")
        if t.device != self.x.device:
            raise LayerInputError(f"{name} is on {t.device} but the layer is on {self.x.device}.")

    def _tensors(self):
        for f in fields(self):
            t = getattr(self, f.name)
            if isinstance(t, Tensor):
                yield f.name, t
            elif isinstance(t, (Norm, FeedForward)):
                for g in fields(t):
                    u = getattr(t, g.name)
                    if isinstance(u, Tensor):
                        yield f"{f.name}.{g.name}", u

    # ------------------------------------------------------------ plain forward
    def visible(self, rows: Optional[Tensor] = None) -> Tensor:
        """(B, R, N) bool: key j visible to query i (mask, causality, windows, padding) for the query
        rows ``rows`` (None: all, R = N)."""
        keys = torch.arange(self.seq_len, device=self.q.device)
        return visible(keys if rows is None else rows.to(self.q.device), keys, self.valid, self.causal, self.window,
                       self.radius)

    def forward(self) -> dict:
        """An independent plain forward of this layer: the hidden states the decompositions must sum to.

        Returns the states of :meth:`stream`: attn_raw, attn, y, mid, ffn_raw, ffn_out, ffn_res, out.
        """
        B, H, N, Dh = self.q.shape
        group = H // self.n_kv_heads
        k = self.k.repeat_interleave(group, 1)
        v = self.v.repeat_interleave(group, 1)
        scores = cap_logits((self.q @ k.transpose(-1, -2)) * self.softmax_scale, self.softcap)
        scores = scores.masked_fill(~self.visible()[:, None], float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
        heads = probs @ v  # (B, H, N, Dh)
        attn = torch.einsum("bhnd,hde->bne", heads, self.w_o) + self.out_bias
        return self.stream(attn)

    def stream(self, attn: Tensor, with_ffn: bool = True) -> dict:
        """The hidden states of the layer from its attention output ``attn`` (B, N, D), b_O included:
        attn_raw (``attn`` itself), attn (what attention adds to the stream, after attn_out_norm), y = x + attn, mid
        (the FFN input),
        and with_ffn: ffn_raw (the FFN output), ffn_out (what the FFN adds: ffn_raw after ffn_out_norm),
        ffn_res (the sum the FFN output joins) and out (the layer output)."""
        structure = self.structure
        raw = attn
        if self.attn_out_norm is not None:
            attn = self.attn_out_norm(attn)
        y = self.x + attn
        if structure == "post":
            mid = stream = self.ln1(y)
        elif structure == "parallel":
            mid, stream = (self.x if self.ln2 is None else self.ln2(self.x)), y
        else:
            mid, stream = (y if self.ln2 is None else self.ln2(y)), y
        states = dict(attn_raw=raw, attn=attn, y=y, mid=mid)
        if not with_ffn:
            return states
        states["ffn_raw"] = ffn_out = self.ffn(mid)
        if self.ffn_out_norm is not None:
            ffn_out = self.ffn_out_norm(ffn_out)
        ffn_res = stream + ffn_out
        out = self.ln2(ffn_res) if structure == "post" else ffn_res
        return dict(states, ffn_out=ffn_out, ffn_res=ffn_res, out=out)

    # ----------------------------------------------------------- construction
    @classmethod
    def from_weights(
        cls,
        x: Tensor,
        w_q: Tensor,
        w_k: Tensor,
        w_v: Tensor,
        w_o: Tensor,
        n_heads: int,
        n_kv_heads: Optional[int] = None,
        b_q: Optional[Tensor] = None,
        b_k: Optional[Tensor] = None,
        b_v: Optional[Tensor] = None,
        b_o: Optional[Tensor] = None,
        rope: Optional[tuple[Tensor, Tensor]] = None,
        **kwargs,
    ) -> "Layer":
        """Build a layer from its weights, as a model would: w_q (D, H*Dh), w_k/w_v (D, KV*Dh),
        w_o (H*Dh, D); rope = (cos, sin) of shape (N, Dh) applied rotate-half style to q and k.
        For pre-LN the attention reads LN1(x)."""
        n_kv_heads = n_kv_heads or n_heads
        B, N, D = x.shape
        Dh = w_q.shape[1] // n_heads
        ln1 = kwargs.get("ln1") if kwargs.get("placement", "post") != "post" else None
        h = x if ln1 is None else ln1(x)

        def proj(w, b, heads):
            t = h @ w
            if b is not None:
                t = t + b
            return t.view(B, N, heads, Dh).transpose(1, 2)

        q, k, v = proj(w_q, b_q, n_heads), proj(w_k, b_k, n_kv_heads), proj(w_v, b_v, n_kv_heads)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return cls(q=q, k=k, v=v, w_o=w_o.reshape(n_heads, Dh, D), x=x, b_o=b_o, **kwargs)


def visible(rows: Tensor, keys: Tensor, valid: Tensor, causal: bool, window: int, radius: int = 0) -> Tensor:
    """(B, R, C) bool, kobattr's one visibility rule in Python: key j is visible to query i when both are
    valid (not padding), j <= i if causal, i - j < window if window > 0 and |i - j| <= radius if radius > 0."""
    diff = rows[:, None] - keys[None, :]
    ok = torch.ones_like(diff, dtype=torch.bool)
    if causal:
        ok &= diff >= 0
    if window:
        ok &= diff < window
    if radius:
        ok &= diff.abs() <= radius
    return ok[None] & valid[:, rows, None] & valid[:, None, keys]


def cap_logits(scores: Tensor, softcap: float) -> Tensor:
    """Logit soft-capping, c tanh(s / c) (Gemma 2), or the scores themselves for c = 0."""
    return softcap * torch.tanh(scores / softcap) if softcap else scores


def apply_rope(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (Llama convention) on (B, H, N, Dh) with cos/sin (N, Dh)."""
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), -1)
    return t * cos + rotated * sin


def head_vectors(layer: "Layer", keys: slice, dtype) -> Tensor:
    """f^h(x_j) = v_j W_O^h for the keys in ``keys``: (B, C, H, D)."""
    group = layer.n_heads // layer.n_kv_heads
    v = layer.v[:, :, keys].to(dtype).repeat_interleave(group, 1)  # (B, H, C, Dh)
    return torch.einsum("bhcd,hde->bche", v, layer.w_o.to(dtype))
