"""Random layers of every kind kobattr supports, built from weights like a model would: the tests and
``kobattr selftest`` use them."""

import torch

from kobattr.layer import FeedForward, Layer, Norm

KINDS = {
    # post-LN LayerNorm + exact GELU with every bias (BERT)
    "bert": dict(placement="post", norm="layernorm", act="gelu", biases=True, H=4, KV=4),
    # pre-LN LayerNorm + tanh GELU (GPT-2)
    "gpt2": dict(placement="pre", norm="layernorm", act="gelu_tanh", biases=True, H=4, KV=4, causal=True),
    # pre-RMSNorm SwiGLU with GQA and RoPE, no biases (Llama)
    "llama": dict(placement="pre", norm="rmsnorm", act="swiglu", biases=False, H=4, KV=2, causal=True, rope=True),
    # post-LN RMSNorm + gated GeGLU, a combination no family uses, to cover the post-LN gated path
    "post_geglu": dict(placement="post", norm="rmsnorm", act="geglu", biases=True, H=4, KV=1),
    # post-LN LayerNorm + ReLU
    "post_relu": dict(placement="post", norm="layernorm", act="relu", biases=True, H=2, KV=2),
    # sandwich norms, RMSNorm, GeGLU (tanh), GQA and RoPE, no biases (Gemma 2/3)
    "gemma2": dict(placement="pre", norm="rmsnorm", act="geglu_tanh", biases=False, H=4, KV=2, causal=True, rope=True,
                   out_norms=True),
    # sandwich norms as LayerNorms with every bias, so that centring and beta of all four norms are exercised
    "sandwich_ln": dict(placement="pre", norm="layernorm", act="gelu", biases=True, H=4, KV=4, out_norms=True),
    # norms after attention and FFN only, RMSNorm, SwiGLU (OLMo 2)
    "olmo2": dict(placement="pre", norm="rmsnorm", act="swiglu", biases=False, H=4, KV=4, causal=True, rope=True,
                  out_norms=True, no_in_norms=True),
    # the same with LayerNorms and biases
    "post_only_ln": dict(placement="pre", norm="layernorm", act="relu", biases=True, H=2, KV=2, out_norms=True,
                         no_in_norms=True),
    # parallel residual, LayerNorm with biases, GELU, RoPE (Pythia / GPT-NeoX)
    "pythia": dict(placement="parallel", norm="layernorm", act="gelu", biases=True, H=4, KV=4, causal=True, rope=True),
    # parallel residual with one norm read by attention and FFN (GPT-J, Phi-2)
    "parallel_shared": dict(placement="parallel", norm="layernorm", act="gelu_tanh", biases=True, H=2, KV=2,
                            shared_norm=True),
}
STRUCTURE_KINDS = {"post": "bert", "pre": "gpt2", "sandwich": "sandwich_ln", "post_only": "post_only_ln",
                   "parallel": "pythia"}  # one random kind per block structure


def rope_tables(N, Dh, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    ang = torch.arange(N, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def random_layer(kind="bert", N=7, B=2, D=32, Dh=8, F=48, pad=0, causal=None, window=0, seed=0,
                 dtype=torch.float64, radius=0, softcap=0.0, device="cpu", H=None, KV=None) -> Layer:
    """A random layer of ``kind`` (a key of KINDS) on ``device``; the last ``pad`` tokens of batch element 0
    are padding. ``H`` and ``KV`` replace the kind's numbers of query and key/value heads."""
    spec = KINDS[kind]
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    H, KV = H or spec["H"], KV or spec["KV"]
    bias = (lambda *s: r(*s, scale=0.3)) if spec["biases"] else (lambda *s: None)
    norm = lambda: Norm(spec["norm"], weight=1 + r(D, scale=0.2), bias=bias(D), eps=1e-5)  # noqa: E731
    gated = spec["act"] in ("swiglu", "geglu", "geglu_tanh")
    ffn = FeedForward(spec["act"], w_in=r(D, F, scale=D ** -0.5), w_out=r(F, D, scale=F ** -0.5), b_in=bias(F),
                      b_out=bias(D), w_gate=r(D, F, scale=D ** -0.5) if gated else None,
                      b_gate=bias(F) if gated else None)
    norms = dict(ln1=norm(), ln2=norm())
    if spec.get("shared_norm"):
        norms["ln2"] = norms["ln1"]
    if spec.get("no_in_norms"):
        norms = dict(ln1=None, ln2=None)
    if spec.get("out_norms"):
        norms.update(attn_out_norm=norm(), ffn_out_norm=norm())
    valid = torch.ones(B, N, dtype=torch.bool)
    if pad:
        valid[0, N - pad:] = False
    rope = None
    if spec.get("rope"):
        cos, sin = rope_tables(N, Dh)
        rope = (cos.to(dtype), sin.to(dtype))
    layer = Layer.from_weights(
        x=r(B, N, D), w_q=r(D, H * Dh, scale=D ** -0.5), w_k=r(D, KV * Dh, scale=D ** -0.5),
        w_v=r(D, KV * Dh, scale=D ** -0.5), w_o=r(H * Dh, D, scale=(H * Dh) ** -0.5), n_heads=H, n_kv_heads=KV,
        b_q=bias(H * Dh), b_k=bias(KV * Dh), b_v=bias(KV * Dh), b_o=bias(D), rope=rope,
        placement=spec["placement"], ffn=ffn, key_valid=valid if pad else None,
        causal=spec.get("causal", False) if causal is None else causal, window=window, radius=radius, softcap=softcap,
        **norms,
    )
    return layer if torch.device(device).type == "cpu" else layer.to(device=device)
