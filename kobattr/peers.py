"""The peers' measures (spec section 10): ALTI, GlobEnc, Value Zeroing and the information-flow edges per layer,
and their rollouts.

None of them stores an N x N x D tensor: the per-pair d-vectors are built one (query block x key block) tile at
a time from per-key rows (per key j a (rows x (H+1)) @ ((H+1) x D) product, kappa as in kobattr/backends/base.py)
and reduced right away. Conventions (which biases go where, statistics, normalisation) follow the authors'
released code, cited beside each function; docs/methods.md says the cost per pair.

    alti        c_ij = max(0, ||y_i||_1 - ||y_i - T_i(x_j)||_1), rows normalised to sum 1 (alti_l2: ||.||_2)
    globenc     N_ij = ||g2_i(v_ij)||, v_ij the ATTNRES-LN part without bias, g2 LN2 with the FFN skipped
    value_zeroing  C_ij = 1 - cos(z_ij, out_i), z_ij the layer output with token j's value vectors zeroed,
                rows normalised to sum 1
    flow_attn   the attention edges of the information-flow graph (Ferrando & Voita 2024; kobattr/flow.py)
    *_rollout   R^1 = C^1, R^l = C^l R^(l-1) through the analysed layers (analyze(); one layer: its map)
    alti_plus   ALTI+ of an encoder-decoder model (alti_plus_rollout; the per-layer maps: kobattr.seq2seq)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from .backends.torch_backend import DEFAULT_BUDGET, block_alpha, kappa_diag_mask
from .layer import LayerInputError, head_vectors
from .methods import Form, form, row_normalize

_L2 = {"alti": False, "alti_l2": True}


class PeerImplementation:
    """What result.backends names for the peers' measures (plain torch, CPU or CUDA); ``l1`` None: ALTI's L1
    proximities from torch tiles."""

    name = "torch"
    l1 = None
    methods = ()  # the methods whose work this implementation does itself (kobattr selftest checks them)


class TritonPeers(PeerImplementation):
    """The peers' measures with ALTI's L1 proximities from kernels/alti_pairs.py (the rest as torch)."""

    name = "triton"
    methods = ("alti",)

    @staticmethod
    def l1(kappa, rows, scale, y, norm, vis):
        from .kernels.alti_pairs import alti_l1

        return alti_l1(kappa, rows, scale, y, norm, vis)


def peer_implementation(attention) -> PeerImplementation:
    """The peers follow the implementation dispatch chose for the layer's attention maps: the triton backend (CUDA
    tensors, or TRITON_INTERPRET=1; its refusals are dispatch's) brings the Triton L1 kernel, any other torch."""
    return TritonPeers() if getattr(attention, "name", None) == "triton" else PeerImplementation()


def peer_methods(methods, structure: str) -> tuple:
    return tuple(m for m in methods if form(m, structure).kind == "peer")


def rollout_methods(methods, structure: str) -> tuple:
    return tuple(m for m in peer_methods(methods, structure) if form(m, structure).rollout)


def stream_form(f: Form) -> Form:
    """The vector form whose pairs T_i(x_j) a peer form decomposes (the residual always in)."""
    return Form("vector", True, f.target, f.norm)


def _key_rows(prep, f: Form, keys: slice) -> Tensor:
    """(B, C, H+1, D) per-key rows [split f^h(x_j) for h, split x_j] of the vector form f."""
    L = prep.layer
    raw = torch.cat([head_vectors(L, keys, prep.dtype), prep.x[:, keys, None]], 2)
    return prep.form_rows(f, raw, keys)


def _block_cap(N: int) -> int:
    """Rows and keys per tile at most max(N / 8, 32), as the torch backend's blocks: no tile comes near N * N * D."""
    return max(N // 8, 32)


def _query_blocks(n_rows: int, N: int, B: int, H: int, budget: int):
    """Blocks of the requested rows whose alpha rows (B, H, block, N) stay within budget."""
    size = max(1, min(_block_cap(N), budget // max(1, B * H * N)))
    for start in range(0, n_rows, size):
        yield start, min(start + size, n_rows)


def _key_step(N: int, B: int, R: int, D: int, budget: int) -> int:
    return max(1, min(_block_cap(N), budget // max(1, 4 * B * R * D)))  # the tile and its few temporaries stay within budget


ALTI_TILE = 1 << 18  # elements of an ALTI tile (B, keys, rows, D): 1 MiB in float32, so that it stays in a core's L2 cache


def _sum_d(t: Tensor) -> Tensor:
    """(...,) sums over the last dim of t (..., D), every entry accumulated in float64: the L2 distance's squares
    summed in float32 chunks came to 2.5x the float32 reference's error (the 2x rule of tests/test_core.py)."""
    return t.sum(-1, dtype=torch.float64)


def _alti_key_step(N: int, B: int, R: int, D: int, budget: int) -> int:
    """Keys per ALTI tile: the (B, keys, R, D) tile within ALTI_TILE elements (and budget), at most the block cap."""
    return max(1, min(_block_cap(N), min(ALTI_TILE, budget) // max(1, B * R * D)))


def peer_maps(prep, methods, rows: Optional[Tensor], budget: int = DEFAULT_BUDGET) -> tuple[dict, dict, dict]:
    """({method: (B, R, N) map}, {method: (B, N) bias norm}, {method: (B, R) completeness error}) of the peer
    methods for the query rows ``rows`` (None: all)."""
    structure = prep.structure
    N = prep.layer.seq_len
    rows = torch.arange(N, device=prep.x.device) if rows is None else rows
    measures = {}
    for m in methods:
        measures.setdefault(form(m, structure).measure, []).append(m)
    maps, bias_norms, completeness = {}, {}, {}
    alti = [k for k in _L2 if k in measures]
    if alti:
        f = form("alti", structure)  # the base method's form (a rollout's names no state)
        out, bias, err = alti_maps(prep, stream_form(f), rows, [_L2[k] for k in alti], budget)
        for k, mp in zip(alti, out):
            for m in measures[k]:
                maps[m] = mp
                if form(m, structure).target is not None:  # not for a rollout, which decomposes no state
                    bias_norms[m], completeness[m] = bias, err
    if "globenc" in measures:
        mp = globenc_map(prep, rows, budget)
        for m in measures["globenc"]:
            maps[m] = mp
    if "flow_attn" in measures:
        mp = flow_attn_map(prep, rows, budget)
        for m in measures["flow_attn"]:
            maps[m] = mp
    if "value_zeroing" in measures:
        mp = value_zeroing_map(prep, rows, budget)
        for m in measures["value_zeroing"]:
            maps[m] = mp
    return maps, bias_norms, completeness


def output_maps(prep, methods, rows: Optional[Tensor], contract: Optional[Tensor], normalize_rows: bool) -> dict:
    """The peer maps as attribute() returns them: (B, R, N) rows, or contract @ map (B, K, N) over the selected rows
    (each map row normalised first with normalize_rows; the maps are O(N^2), so they are formed, then contracted).
    Their per-row checks go to prep.peer_checks (method -> (rows, bias norms, completeness))."""
    N = prep.layer.seq_len
    every = torch.arange(N, device=prep.x.device)
    selected = every if rows is None else rows
    if not hasattr(prep, "peer_checks"):
        # the first call (not the spot check's rerun) computes every row: a ratio needs its whole row, and the
        # result's ratios cover every row, with rows= too
        maps, bias_norms, completeness = peer_maps(prep, methods, every, prep.budget)
        prep.peer_checks = {m: (every, maps[m], bias_norms.get(m), completeness.get(m)) for m in methods}
        if rows is not None:
            maps = {m: mp[:, rows] for m, mp in maps.items()}
    else:
        maps, _, _ = peer_maps(prep, methods, selected, prep.budget)
    if contract is None:
        return maps
    out = {}
    for m, mp in maps.items():
        if normalize_rows:
            mp = row_normalize(mp)
        out[m] = torch.einsum("bkr,brn->bkn", contract[:, :, selected].to(mp.dtype), mp)
    return out


def peer_result(prep, result, m: str, nan_pad: Tensor) -> None:
    """Fill a LayerAttribution's ratio (and bias norm and completeness where the measure has them) of method m."""
    every, mp, bias, err = prep.peer_checks[m]
    result.ratios[m] = peer_ratio(mp, every) + nan_pad
    if bias is not None:
        result.bias_norms[m], result.completeness[m] = bias, err


def peer_ratio(m: Tensor, rows: Tensor) -> Tensor:
    """(B, R) the share of a peer map's row that goes to other tokens: 1 - M_ii / sum_j M_ij (0 for a zero row)."""
    diag = m[:, torch.arange(len(rows), device=m.device), rows]
    total = m.sum(-1)
    return torch.where(total > 0, 1 - diag / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))


# ----------------------------------------------------------------------------------------------- ALTI
def alti_maps(prep, f: Form, rows: Tensor, l2: list, budget: int) -> tuple[list, Tensor, Tensor]:
    """ALTI (Ferrando et al. 2022) of the vector form f: ([(B, R, N) per entry of l2], bias norm of every row (B, N),
    completeness error of the rows (B, R)).

    Follows mt-upc/transformer-contributions@4f89039 src/contributions.py get_contributions (T_i(x_j) = the
    ATTNRES(-LN) part, y_i the block output: post-LN the LN1 output, pre-LN the stream x_i + a_i) and
    src/utils_contributions.py normalize_contributions 'min_sum' (c = clip(||y_i||_p - ||y_i - T_i(x_j)||_p, 0),
    divided by the row sum). Differences, each < 1e-6 relative: their std adds eps to the states, kobattr uses the
    model's own statistic (eps inside the root); F.pairwise_distance adds 1e-6 to the difference, kobattr does not.
    ||y||_1 - ||y - T||_1 cancels (spec section 10, precision): the L1 proximity is summed as sum_d (|y_d| - |y_d -
    T_d|), whose terms do not cancel; the L2 distance's squares are summed in float64 (``_sum_d``). Per (row block x
    key tile) one batched (rows x (H+1)) @ ((H+1) x D) product into a reused buffer and three in-place passes."""
    L = prep.layer
    B, H, N, _ = L.q.shape
    D = L.d_model
    scale = prep.form_scale(f)  # (B, N)
    total, _, bias, real = prep.vector_parts(f)
    y = real  # the block's real output, which every pair is compared with
    cache_rows = B * N * (H + 1) * D <= 4 * budget
    cached = _key_rows(prep, f, slice(0, N)) if cache_rows else None
    outs = [torch.zeros(B, len(rows), N, dtype=torch.float64, device=L.x.device) for _ in l2]  # normalised in float64
    parts_sum = torch.zeros(B, len(rows), D, dtype=prep.dtype, device=L.x.device)
    kernel = getattr(getattr(prep, "peers", None), "l1", None)  # the Triton L1 proximities, where dispatch chose it
    if kernel is not None and cached is None:
        cached = _key_rows(prep, f, slice(0, N))  # the kernel reads every key's rows
    torch_tiles = [k for k, p2 in enumerate(l2) if p2 or kernel is None]
    for r0, r1 in _query_blocks(len(rows), N, B, H, budget):
        q_rows = rows[r0:r1]
        R = r1 - r0
        alpha, vis = block_alpha(prep.attn, q_rows, prep.dtype)  # (B, H, R, N)
        y_rows = y[:, q_rows]  # (B, R, D)
        norm_y = [y_rows.double().norm(p=2 if p2 else 1, dim=-1) for p2 in l2]
        s_rows = scale[:, q_rows]
        if kernel is not None:
            cols = torch.arange(N, device=L.x.device)
            kappa = torch.cat([alpha, kappa_diag_mask(q_rows, cols, vis).to(prep.dtype)[:, None]], 1)  # (B, H+1, R, N)
            parts_sum[:, r0:r1] = torch.einsum("bkrn,bnkd->brd", kappa, cached) * s_rows[..., None]
            for k, p2 in enumerate(l2):
                if not p2:
                    outs[k][:, r0:r1] = kernel(kappa, cached, s_rows, y_rows, norm_y[k], vis)
            if not torch_tiles:
                continue
        step = _alti_key_step(N, B, R, D, budget)
        buf = torch.empty(B * step * R * D, dtype=prep.dtype, device=L.x.device)  # one tile, reused
        # every key's coefficients at once, transposed (B, N, H+1, R) (one 2-D transpose per head, the fast copy), the
        # row scale in and negated, so that each tile is -T_i(x_j); the residual's is [i == j] for visible pairs
        coef = torch.empty(B, N, H + 1, R, dtype=prep.dtype, device=L.x.device)
        for h in range(H):
            coef[:, :, h] = alpha[:, h].transpose(1, 2)
        coef[:, :, H] = 0
        own = torch.arange(R, device=L.x.device)
        coef[:, q_rows, H, own] = vis[:, own, q_rows].to(prep.dtype)
        coef *= -s_rows[:, None, None]
        want_l1, want_l2 = (any(l2[k] == p2 for k in torch_tiles) for p2 in (False, True))
        abs_y = y_rows.abs()[:, None]
        prox = torch.empty(B, N, R, dtype=prep.dtype, device=L.x.device) if want_l1 else None  # per key, this block
        dist2 = torch.empty(B, N, R, dtype=torch.float64, device=L.x.device) if want_l2 else None
        for c0 in range(0, N, step):
            keys = slice(c0, min(c0 + step, N))
            C = keys.stop - keys.start
            key_rows = cached[:, keys] if cached is not None else _key_rows(prep, f, keys)  # (B, C, H+1, D)
            tile = buf[:B * C * R * D].view(B, C, R, D)
            torch.bmm(coef[:, keys].reshape(B * C, H + 1, R).transpose(1, 2), key_rows.reshape(B * C, H + 1, D),
                      out=tile.view(B * C, R, D))
            if kernel is None:
                parts_sum[:, r0:r1] -= tile.sum(1)
            tile += y_rows[:, None]  # y_i - T_i(x_j) (B, C, R, D), in place
            if want_l2:
                dist2[:, keys] = _sum_d(tile * tile if want_l1 else tile.mul_(tile))
            if want_l1:
                # ||y||_1 - ||y - T||_1 summed as sum_d (|y_d| - |y_d - T_d|): each term is at most |T_d| in size, so
                # the sum does not cancel and the tile's dtype holds it (spec section 10, precision)
                torch.sub(abs_y, tile.abs_(), out=tile)
                prox[:, keys] = tile.sum(-1)
        for k in torch_tiles:
            c = (norm_y[k][..., None] - dist2.transpose(1, 2).sqrt()) if l2[k] else prox.transpose(1, 2).double()
            outs[k][:, r0:r1] = c.clamp_min(0) * vis
    valid = L.valid[:, rows]
    err = (parts_sum + bias[:, rows] - y[:, rows]).norm(dim=-1) / y[:, rows].norm(dim=-1).clamp_min(1e-30)
    return [row_normalize(o).to(prep.dtype) for o in outs], bias.norm(dim=-1) * L.valid, torch.where(valid, err, 0.0)


# -------------------------------------------------------------------------------------------- GlobEnc
def globenc_map(prep, rows: Tensor, budget: int) -> Tensor:
    """GlobEnc's per-layer map N_ij (B, R, N) of a post-LN layer (Modarressi et al. 2022).

    As mohsenfayyaz/GlobEnc@a26b38b src/modeling/modeling_bert.py BertNormOutput.forward (the ATTNRES-LN part
    gamma1 C(t_ij + [i == j] x_i) / sqrt(var1_i + eps1), no bias) and BertLayer.forward (that part through LN2 with
    the FFN skipped: gamma2 C(part) / sqrt(var2_i + eps2), var2 of LN2's real input, FFN output included). A norm,
    so a Gram form: per key the rows ln2.split(ln1.split(.)), row scale s1_i s2_i."""
    L = prep.layer
    B, H, N, _ = L.q.shape
    f = Form("vector", True, "mid", "ln1")
    ln2, mid = prep.cast.ln2, prep.real["mid"]
    s2 = ln2.inv_std(prep.real["ffn_res"] if "ffn_res" in prep.real else mid + prep.cast.ffn(mid))  # LN2's real input
    scale = prep.form_scale(f) * s2  # (B, N)
    grams = torch.zeros(B, N, H + 1, H + 1, dtype=prep.dtype, device=L.x.device)
    step = max(1, budget // max(1, B * (H + 1) * L.d_model))
    for c0 in range(0, N, step):
        keys = slice(c0, min(c0 + step, N))
        key_rows = ln2.split(_key_rows(prep, f, keys))
        grams[:, keys] = key_rows @ key_rows.transpose(-1, -2)
    out = torch.zeros(B, len(rows), N, dtype=prep.dtype, device=L.x.device)
    cols = torch.arange(N, device=L.x.device)
    for r0, r1 in _query_blocks(len(rows), N, B, H, budget):
        q_rows = rows[r0:r1]
        alpha, vis = block_alpha(prep.attn, q_rows, prep.dtype)
        kappa = torch.cat([alpha.permute(0, 2, 3, 1), kappa_diag_mask(q_rows, cols, vis).to(prep.dtype)[..., None]], -1)
        quad = torch.einsum("brnh,bnhg,brng->brn", kappa, grams, kappa).clamp_min(0)
        out[:, r0:r1] = quad.sqrt() * scale[:, q_rows, None] * vis
    return out


# ------------------------------------------------------------------------------------------ Value Zeroing
def rest_of_block(prep, x_rows: Tensor, attn: Tensor) -> Tensor:
    """The layer output (B, P, D) of P pair rows: the stream x_rows (B, P, D) plus the attention output ``attn``
    (B, P, D; b_O included, before any norm after attention) through the rest of the block (the residual, the
    block's norms and FFN, as Layer.stream computes them)."""
    return replace(prep.cast, x=x_rows).stream(attn)["out"]


def _cosine_distance(z: Tensor, out: Tensor) -> Tensor:
    """1 - cos(z, out) over the last dim, in float64, from delta = z - out so that nearly equal vectors do not
    cancel: ||z|| ||o|| - z.o = (||delta||^2 - (||z|| - ||o||)^2) / 2, ||z|| - ||o|| = (2 delta.o + ||delta||^2) /
    (||z|| + ||o||)."""
    z, out = z.double(), out.double()
    delta = z - out
    nz, no, dd = z.norm(dim=-1), out.norm(dim=-1), delta.pow(2).sum(-1)
    gap = (2 * (delta * out).sum(-1) + dd) / (nz + no).clamp_min(1e-300)
    return ((dd - gap * gap) / 2).clamp_min(0) / (nz * no).clamp_min(1e-300)


def value_zeroing_map(prep, rows: Tensor, budget: int) -> Tensor:
    """Value Zeroing (Mohebbi et al. 2023): C_ij = 1 - cos(z_ij, out_i) (B, R, N), rows normalised to sum 1.

    As hmohebbi/ValueZeroing@57d448d scoring/value_zeroing.py (the layer re-run from the previous layer's output
    with value_layer[:, :, t] = 0, b_V included; sklearn cosine_distances against the original layer output;
    score_matrix / its row sum): zeroing token j's values changes row i's attention output by exactly -t_ij
    (alpha unchanged), so z_ij = rest of the block applied to a_i + b_O - t_ij. Pairs go through the block as
    batches of rows, never one forward per token. out_i is the same function on a_i + b_O (kobattr's forward,
    not the model's; they agree to float precision, model_error)."""
    L = prep.layer
    B, H, N, _ = L.q.shape
    D = L.d_model
    attn_total = prep.attn_sum + prep.b_o  # (B, N, D) the raw attention output
    out = torch.zeros(B, len(rows), N, dtype=torch.float64, device=L.x.device)  # normalised in float64
    full = rest_of_block(prep, prep.x[:, rows], attn_total[:, rows])  # (B, R, D)
    if prep.structure in _VZ_PARTS:
        _value_zeroing_parts(prep, rows, budget, attn_total, full, out)
        return row_normalize(out).to(prep.dtype)
    width = max(L.ffn.w_in.shape[1], D)
    for r0, r1 in _query_blocks(len(rows), N, B, H, budget):
        q_rows = rows[r0:r1]
        R = len(q_rows)
        alpha, vis = block_alpha(prep.attn, q_rows, prep.dtype)
        step = max(1, min(_block_cap(N), budget // max(1, 8 * B * R * width)))  # pair rows and the block's temporaries
        for c0 in range(0, N, step):
            keys = slice(c0, min(c0 + step, N))
            C = keys.stop - keys.start
            heads = head_vectors(L, keys, prep.dtype)  # (B, C, H, D)
            t = (alpha[..., keys].permute(0, 3, 2, 1) @ heads).transpose(1, 2)  # t_ij (B, R, C, D)
            attn = (attn_total[:, q_rows, None] - t).reshape(B, R * C, D)
            x_pairs = prep.x[:, q_rows, None].expand(B, R, C, D).reshape(B, R * C, D)
            z = rest_of_block(prep, x_pairs, attn).view(B, R, C, D)
            dist = _cosine_distance(z, full[:, r0:r1, None])
            out[:, r0:r1, keys] = dist * vis[..., keys]
    return row_normalize(out).to(prep.dtype)


# the structures whose FFN input is a norm g of the stream y = x + a alone (no norm after attention): post (g = LN1,
# which is also the stream the FFN joins) and pre (g = LN2 before the FFN)
_VZ_PARTS = {"post": "ln1", "pre": "ln2"}


def _value_zeroing_parts(prep, rows: Tensor, budget: int, attn_total: Tensor, full: Tensor, out: Tensor) -> None:
    """Value Zeroing's distances (B, R, N) into ``out`` for a structure of _VZ_PARTS, the FFN's pre-activations from
    per-key parts, as the FF maps build theirs: g(y_i - t_ij) W = s_ij (split(y_i) W - sum_h alpha^h_ij split(f^h(x_j))
    W) + beta W, split the norm's row-independent linear part and s_ij = 1 / s(y_i - t_ij) the pair's own statistic
    (the norm stays exact, per pair). A pair then costs H F MACs for each pre-activation (W_in, and W_gate) instead of
    D F, plus the W_out product; z_ij follows Layer.stream from there."""
    L = prep.layer
    cast = prep.cast
    B, H, N, _ = L.q.shape
    D = L.d_model
    ffn = cast.ffn
    norm = getattr(cast, _VZ_PARTS[prep.structure])
    F = ffn.w_in.shape[1]
    weights = [ffn.w_in] + ([ffn.w_gate] if ffn.gated else [])
    biases = [ffn.b_in] + ([ffn.b_gate] if ffn.gated else [])
    consts = [norm.bias_vector(D, w[:, 0]) @ w + (0 if b_ is None else b_) for w, b_ in zip(weights, biases)]  # (F,)
    from .ig import activation_fn

    act = activation_fn(ffn.base_activation)
    y_all = prep.x + attn_total  # (B, N, D) the stream of every row with nothing zeroed
    # keys whose per-head parts split(f^h(x_j)) W (B, keys, H, F) are kept at once (one chunk at moderate N); alpha is
    # recomputed per chunk
    chunk = max(1, min(N, 4 * budget // max(1, B * H * F * len(weights))))
    for k0 in range(0, N, chunk):
        kc = slice(k0, min(k0 + chunk, N))
        heads = head_vectors(L, kc, prep.dtype)  # (B, Kc, H, D)
        split_heads = norm.split(heads).reshape(-1, D)  # one GEMM per weight (a 4-D matmul would batch over keys)
        parts = [(split_heads @ w).view(B, -1, H, F) for w in weights]  # (B, Kc, H, F)
        for r0, r1 in _query_blocks(len(rows), N, B, H, budget):
            q_rows = rows[r0:r1]
            R = len(q_rows)
            alpha, vis = block_alpha(prep.attn, q_rows, prep.dtype)  # (B, H, R, N)
            y_rows = y_all[:, q_rows]  # (B, R, D)
            own = [norm.split(y_rows) @ w for w in weights]  # (B, R, F)
            step = max(1, min(_block_cap(N), budget // max(1, 8 * B * R * max(F, D))))
            for c0 in range(kc.start, kc.stop, step):
                keys = slice(c0, min(c0 + step, kc.stop))
                C = keys.stop - keys.start
                a = alpha[..., keys].permute(0, 3, 2, 1).reshape(B * C, R, H)  # (B C, R, H) batched over keys
                t = torch.bmm(a, heads[:, c0 - k0:keys.stop - k0].reshape(B * C, H, D)).view(B, C, R, D)
                y = y_rows[:, None] - t  # the stream with token j's values zeroed (B, C, R, D)
                s = norm.inv_std(y)[..., None]  # (B, C, R, 1)
                pre = []
                for part, mine, const in zip(parts, own, consts):
                    lin = torch.bmm(a, part[:, c0 - k0:keys.stop - k0].reshape(B * C, H, F)).view(B, C, R, F)
                    pre.append(torch.sub(mine[:, None], lin, out=lin).mul_(s).add_(const))
                hidden = act(pre[1]).mul_(pre[0]) if ffn.gated else act(pre[0])
                ffn_out = hidden.view(-1, F) @ ffn.w_out
                if ffn.b_out is not None:
                    ffn_out += ffn.b_out
                ffn_out = ffn_out.view(B, C, R, D)
                # post: the FFN joins the LN1 output and LN2 follows; pre: it joins the stream y itself
                z = cast.ln2(norm(y) + ffn_out) if prep.structure == "post" else y + ffn_out
                dist = _cosine_distance(z, full[:, r0:r1][:, None])  # (B, C, R)
                out[:, r0:r1, keys] = dist.transpose(1, 2) * vis[..., keys]


# ------------------------------------------------------------------------------------- information flow
FLOW_EPS = 1e-5  # facebookresearch/llm-transparency-tool@f1340f0 routes/contributions.py get_contributions


def flow_attn_map(prep, rows: Tensor, budget: int) -> Tensor:
    """The attention block's edges of the information-flow graph (Ferrando & Voita 2024) (B, R, N): row i's parts
    are the residual x_i and every (key j, head h) part alpha^h_ij f^h(x_j) of the stream y_i = x_i + a_i (after the
    norm after attention, linearised, where there is one); each part's proximity max(EPS, ||y_i||_1 - ||y_i -
    part||_1), normalised over all of row i's parts; the map sums the heads and adds the residual's share to (i, i).

    As facebookresearch/llm-transparency-tool@f1340f0 routes/contributions.py get_attention_contributions /
    get_contributions_with_one_off_part / get_contributions (EPS = 1e-5 as its clip floor, so every key position's
    parts count, also those the query cannot see: their parts are 0 and get EPS) and routes/graph.py
    build_full_graph (the attention and residual edges between the same nodes summed). Padded keys have no parts."""
    L = prep.layer
    B, H, N, _ = L.q.shape
    D = L.d_model
    f = Form("vector", True, "y")
    scale = prep.form_scale(f)
    y = prep.real["y"]
    out = torch.zeros(B, len(rows), N, dtype=torch.float64, device=L.x.device)
    valid = L.valid
    for r0, r1 in _query_blocks(len(rows), N, B, H, budget):
        q_rows = rows[r0:r1]
        alpha, _ = block_alpha(prep.attn, q_rows, prep.dtype)
        y_rows = y[:, q_rows]
        norm_y = y_rows.abs().sum(-1, dtype=torch.float64)  # (B, R)

        def proximity(part):  # part (B, R, ..., D) -> (B, R, ...) float64
            extra = part.dim() - 3
            dist = (y_rows.view(B, r1 - r0, *([1] * extra), D) - part).abs().sum(-1, dtype=torch.float64)
            return (norm_y.view(B, r1 - r0, *([1] * extra)) - dist).clamp_min(FLOW_EPS)

        res = proximity(prep.x[:, q_rows])  # the residual part x_i
        total = res.clone()
        step = _key_step(N, B, r1 - r0, D, budget)
        for c0 in range(0, N, step):
            keys = slice(c0, min(c0 + step, N))
            key_rows = _key_rows(prep, f, keys)[:, :, :H]  # (B, C, H, D)
            for h in range(H):
                part = alpha[:, h, :, keys, None] * key_rows[:, None, :, h] * scale[:, q_rows, None, None]
                p = proximity(part) * valid[:, None, keys]
                out[:, r0:r1, keys] += p
                total += p.sum(-1)
        idx = torch.arange(r1 - r0, device=L.x.device)
        out[:, r0:r1][:, idx, q_rows] += res
        out[:, r0:r1] /= total[..., None]
    return (out * valid[:, rows, None]).to(prep.dtype)


# ------------------------------------------------------------------------------------------------ rollout
def check_rollout(methods, structure: str, layers: list, rows, contract) -> None:
    """LayerInputError in a sentence where a rollout cannot be formed: it needs full maps of consecutive layers."""
    wanted = rollout_methods(methods, structure)
    if not wanted:
        return
    if rows is not None or contract is not None:
        raise LayerInputError(f"{', '.join(wanted)} multiplies full maps through the layers; drop rows= and contract=.")
    if list(layers) != list(range(layers[0], layers[0] + len(layers))):
        raise LayerInputError(f"{', '.join(wanted)} needs consecutive layers (it starts at the first analysed one), "
                              f"got {list(layers)}.")


def roll_out(maps: Tensor) -> Tensor:
    """(L, B, N, N) R^1 = C^1, R^l = C^l R^(l-1) of per-layer maps (L, B, N, N), in float64, returned in their dtype
    (mt-upc/transformer-contributions@4f89039 compute_joint_attention; GlobEnc's BertEncoder.forward; ValueZeroing's
    compute_joint_attention(res=False): no identity added, no renormalisation)."""
    out = torch.empty_like(maps)
    acc = None
    for li, layer in enumerate(maps.double()):
        acc = layer if acc is None else layer @ acc
        out[li] = acc.to(maps.dtype)
    return out


def apply_rollouts(result) -> None:
    """Replace each rollout method's per-layer maps (one layer's C) in an Attribution by the rollout through the
    analysed layers, and its ratios by those of the rolled-out map."""
    for m in rollout_methods(result.methods, result.structure):
        rolled = roll_out(result.maps[m])
        result.maps[m] = rolled
        n = rolled.shape[-1]
        idx = torch.arange(n)
        ratio = torch.stack([peer_ratio(layer, idx) for layer in rolled])
        result.ratios[m] = ratio + torch.where(result.attention_mask, 0.0, float("nan")).to(ratio.dtype)


def alti_plus_rollout(encoder: Tensor, self_maps: Tensor, cross_maps: Tensor) -> Tensor:
    """ALTI+ (Ferrando et al. 2022b): (L, B, T, T + S) the decoder's ALTI rolled out through its L layers, the source
    columns through the encoder's, target columns first (kobattr's whole-decoder-layer order: column k < T target
    token k, column T + j source token j), in float64, returned in the maps' dtype.

    encoder (B, S, S): the encoder's alti_rollout after its last layer; self_maps (L, B, T, T): each decoder layer's
    self-attention alti; cross_maps (L, B, T, S + 1): its cross_alti (column S: the residual p_i). Per layer the joint
    map is J_tgt = C_self scaled per row by C_cross[:, S] (what reaches the cross block's residual) and
    J_src = C_cross[:, :S] R_enc; R^1 = [J_tgt^1, J_src^1], R^l = [J_tgt^l R_tgt^(l-1), J_tgt^l R_src^(l-1) + J_src^l]
    with rows renormalised, as mt-upc/transformer-contributions-nmt@0af8538 wrappers/transformer_wrapper.py
    get_contribution_rollout (its columns are [source; target])."""
    T, S = self_maps.shape[-1], encoder.shape[-1]
    out = torch.empty(*self_maps.shape[:-1], T + S, dtype=self_maps.dtype, device=self_maps.device)
    enc = encoder.double()
    acc = None
    for li, (c_self, c_cross) in enumerate(zip(self_maps.double(), cross_maps.double())):
        tgt = c_self * c_cross[..., S:]  # (B, T, T)
        src = c_cross[..., :S] @ enc  # (B, T, S)
        acc = (torch.cat([tgt, src], -1) if acc is None else
               row_normalize(torch.cat([tgt @ acc[..., :T], tgt @ acc[..., T:] + src], -1)))
        out[li] = acc.to(out.dtype)
    return out
