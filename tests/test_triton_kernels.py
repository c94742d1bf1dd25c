"""The Triton kernels against the fp64 primitive oracle, run by the Triton interpreter on the CPU.

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton. Shapes stay small (the
interpreter executes every tile in numpy) but cross tile borders: N = 97 spans several query and
key tiles, N = 1 and 7 are partial single tiles. The interpreter takes the key splits an H100 would
(kernels/rows.py INTERPRETER_SMS), so launches over more than one key tile split their keys; the
key_split_mode tests run the same calls with one split too.
"""

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from kobattr.backends.base import BackendUnavailable  # noqa: E402
from kobattr.backends.triton_backend import TritonBackend  # noqa: E402
from kobattr.kernels import attention_pairs, ff_pairs, rows as kernel_rows  # noqa: E402
from primitive_oracle import (oracle_alpha, oracle_attention_maps, oracle_ff_maps, oracle_row_lse,  # noqa: E402
                              random_attention, random_ff_parts, random_grams, scrambled_layout)

if TritonBackend.unavailable_reason() is not None:
    pytest.skip(TritonBackend.unavailable_reason(), allow_module_level=True)

BACKEND = TritonBackend()

# (N, H, KV, Dh, causal, window, pad[, radius / softcap options]): masks, GQA (4/2, 4/1), padded heads
# (12 -> 16) and Dh = 80; symmetric windows cutting tiles on both sides, and soft-caps of 1-1.5 against
# logits of standard deviation 3, which capping changes clearly
PATTERNS = {
    "N1": (1, 4, 2, 16, False, 0, 0),
    "N7-causal-pad": (7, 4, 2, 16, True, 0, 2),
    "N7-window": (7, 4, 4, 32, False, 3, 0),
    "N97-causal-window-gqa1": (97, 4, 1, 16, True, 13, 5),
    "N97-pad-gqa2": (97, 4, 2, 16, False, 0, 20),
    "N20-H12-dh80": (20, 12, 3, 80, True, 0, 3),
    "N7-softcap": (7, 4, 4, 32, False, 0, 0, dict(softcap=1.0, logit_std=3.0)),
    "N97-radius-pad-gqa2": (97, 4, 2, 16, False, 0, 5, dict(radius=9)),
    "N97-causal-window-radius-softcap-gqa1": (97, 4, 1, 16, True, 13, 5, dict(radius=6, softcap=1.5, logit_std=3.0)),
    # non-causal: the window bounds the keys before a query, the radius those after it
    "N40-window-radius-softcap-gqa2": (40, 4, 2, 16, False, 5, 3, dict(radius=8, softcap=1.0, logit_std=3.0)),
}
FEATURE_PATTERNS = [name for name, pattern in PATTERNS.items() if len(pattern) > 7]


def attention(name, dtype=torch.float32, seed=0):
    N, H, KV, Dh, causal, window, pad, *options = PATTERNS[name]
    return random_attention(B=2, H=H, KV=KV, N=N, Dh=Dh, causal=causal, window=window, pad=pad, dtype=dtype,
                            seed=seed, **(options[0] if options else {}))


def assert_close(out, ref, rtol=1e-5):
    """fp32 kernel vs fp64 oracle: the interpreter's fp32 dot is exact, so only fp32 rounding remains."""
    ref = ref.to(out.dtype)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * max(ref.abs().max().item(), 1e-6))


def assert_lowprec_close(out, ref64, ref_rounded):
    """Flash-attention rule: the kernel on rounded inputs is at most 2x as far from the fp64 truth as
    the fp64 oracle on those rounded inputs is (plus a small absolute floor)."""
    err = (out.double() - ref64).abs().max().item()
    budget = 2 * (ref_rounded - ref64).abs().max().item() + 1e-5 * ref64.abs().max().item()
    assert err <= budget, (err, budget)


def rows_for(N):
    return torch.tensor(sorted({N - 1, 0, N // 2, N // 3}, reverse=True), dtype=torch.int64)


# ---------------------------------------------------------------- attention maps


@pytest.mark.parametrize("name", list(PATTERNS))
def test_attention_full_map_and_alpha(name):
    attn = attention(name)
    B, H, N, _ = attn.q.shape
    grams, row_scale = random_grams(B, N, 3, H)
    maps, alpha = BACKEND.attention_maps(attn, grams, row_scale, want_alpha=True)
    assert maps.shape == (B, 3, N, N) and alpha.shape == (B, H, N, N)
    assert_close(maps, oracle_attention_maps(attn, grams, row_scale))
    assert_close(alpha, oracle_alpha(attn))


@pytest.mark.parametrize("name", ["N1", "N7-causal-pad", "N97-causal-window-gqa1",
                                  "N97-causal-window-radius-softcap-gqa1"])
def test_attention_rows(name):
    attn = attention(name)
    B, H, N, _ = attn.q.shape
    grams, row_scale = random_grams(B, N, 2, H)
    rows = rows_for(N)
    maps, alpha = BACKEND.attention_maps(attn, grams, row_scale, rows=rows, want_alpha=True)
    assert maps.shape == (B, 2, len(rows), N)
    assert_close(maps, oracle_attention_maps(attn, grams, row_scale, rows=rows))
    assert_close(alpha, oracle_alpha(attn, rows))
    maps, alpha = BACKEND.attention_maps(attn, grams, row_scale, rows=rows)
    assert alpha is None
    assert_close(maps, oracle_attention_maps(attn, grams, row_scale, rows=rows))


@pytest.mark.parametrize("normalize_rows", [False, True])
@pytest.mark.parametrize("name", ["N7-causal-pad", "N97-causal-window-gqa1", "N97-pad-gqa2",
                                  "N40-window-radius-softcap-gqa2"])
def test_attention_weights_contraction(name, normalize_rows):
    attn = attention(name)
    B, H, N, _ = attn.q.shape
    grams, row_scale = random_grams(B, N, 3, H)
    weights = torch.rand(B, 3, N, generator=torch.Generator().manual_seed(5))
    out, alpha = BACKEND.attention_maps(attn, grams, row_scale, weights=weights, normalize_rows=normalize_rows,
                                        want_alpha=True)
    assert out.shape == (B, 3, 3, N)
    assert_close(out, oracle_attention_maps(attn, grams, row_scale, weights=weights, normalize_rows=normalize_rows))
    assert_close(alpha, oracle_alpha(attn))


@pytest.mark.parametrize("normalize_rows", [False, True])
@pytest.mark.parametrize("name", ["N1", "N7-causal-pad", "N7-window", "N97-causal-window-gqa1", "N97-pad-gqa2",
                                  "N97-radius-pad-gqa2", "N40-window-radius-softcap-gqa2"])
def test_attention_weights_contraction_over_selected_rows(name, normalize_rows):
    """rows with weights: the contraction runs over the selected rows only (a repeated row counts twice),
    weights indexed by position; alpha follows ``rows``."""
    attn = attention(name)
    B, H, N, _ = attn.q.shape
    grams, row_scale = random_grams(B, N, 2, H)
    weights = torch.rand(B, 3, N, generator=torch.Generator().manual_seed(6))
    rows = torch.cat([rows_for(N), torch.tensor([N // 2])])
    out, alpha = BACKEND.attention_maps(attn, grams, row_scale, rows=rows, weights=weights,
                                        normalize_rows=normalize_rows, want_alpha=True)
    assert out.shape == (B, 2, 3, N)
    assert_close(out, oracle_attention_maps(attn, grams, row_scale, rows=rows, weights=weights,
                                            normalize_rows=normalize_rows))
    assert_close(alpha, oracle_alpha(attn, rows))


def test_no_selected_rows():
    attn = attention("N7-causal-pad")
    grams, row_scale = random_grams(2, 7, 2, 4)
    none = torch.zeros(0, dtype=torch.int64)
    maps, alpha = BACKEND.attention_maps(attn, grams, row_scale, rows=none, want_alpha=True)
    assert maps.shape == (2, 2, 0, 7) and alpha.shape == (2, 4, 0, 7)
    out, _ = BACKEND.attention_maps(attn, grams, row_scale, rows=none, weights=torch.ones(2, 3, 7))
    assert out.shape == (2, 2, 3, 7) and (out == 0).all()
    parts = random_ff_parts(2, 7, 4)
    out = BACKEND.ff_maps(attn, parts, rows=none, weights=torch.ones(2, 3, 7), normalize_rows=True)
    assert out.shape == (2, 3, 3, 7) and (out == 0).all()


def test_attention_many_weight_rows_and_heads():
    """K > BLOCK_K loops over weight blocks; H = 17 pads the head axis to 32."""
    attn = random_attention(B=1, H=17, KV=1, N=9, Dh=32, causal=True, seed=3)
    grams, row_scale = random_grams(1, 9, 2, 17)
    weights = torch.rand(1, 70, 9, generator=torch.Generator().manual_seed(7))
    out, _ = BACKEND.attention_maps(attn, grams, row_scale, weights=weights)
    assert_close(out, oracle_attention_maps(attn, grams, row_scale, weights=weights))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["N7-causal-pad", "N97-causal-window-gqa1", "N40-window-radius-softcap-gqa2"])
def test_attention_low_precision(name, dtype):
    attn = attention(name)
    rounded = dataclasses.replace(attn, q=attn.q.to(dtype), k=attn.k.to(dtype))
    B, H, N, _ = attn.q.shape
    grams, row_scale = random_grams(B, N, 3, H)
    maps, alpha = BACKEND.attention_maps(rounded, grams, row_scale, want_alpha=True)
    assert_lowprec_close(maps, oracle_attention_maps(attn, grams, row_scale),
                         oracle_attention_maps(rounded, grams, row_scale))
    assert_lowprec_close(alpha, oracle_alpha(attn), oracle_alpha(rounded))


def test_attention_native_half_dot(monkeypatch):
    """The GPU path for fp16 (q and k dotted in fp16, no upcast); the interpreter's fp16 dot is sound."""
    native = lambda dtype: (dtype == torch.float32, "tf32")  # noqa: E731
    monkeypatch.setattr(attention_pairs, "dot_settings", native)
    attn = attention("N97-pad-gqa2")
    rounded = dataclasses.replace(attn, q=attn.q.half(), k=attn.k.half())
    grams, row_scale = random_grams(2, 97, 1, 4)
    maps, _ = BACKEND.attention_maps(rounded, grams, row_scale)
    assert_lowprec_close(maps, oracle_attention_maps(attn, grams, row_scale),
                         oracle_attention_maps(rounded, grams, row_scale))


def test_row_lse_of_rows_without_keys_is_finite():
    """A fully padded batch element: every row sees nothing, maps and alpha are 0, nothing is NaN."""
    attn = attention("N7-causal-pad")
    attn.valid[1] = False
    grams, row_scale = random_grams(2, 7, 1, 4)
    lse = kernel_rows.row_lse(attn.q, attn.k, attn.valid.to(torch.int8), attn.causal, attn.window, attn.scale, None,
                              kernel_rows.dot_settings(attn.q.dtype))
    assert torch.isfinite(lse).all()
    maps, alpha = BACKEND.attention_maps(attn, grams, row_scale, want_alpha=True)
    assert (maps[1] == 0).all() and (alpha[1] == 0).all()
    assert_close(maps, oracle_attention_maps(attn, grams, row_scale))


# ---------------------------------------------------------------- row_lse (the row_stats primitive)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_row_lse(name):
    """The backend's natural-log lse (the kernel's base-2 one times ln 2) on the rows that see a key."""
    attn = attention(name)
    lse = BACKEND.row_lse(attn)
    want, seen = oracle_row_lse(attn)
    assert lse.dtype == torch.float32 and lse.shape == want.shape
    assert_close(lse[seen], want[seen])
    assert torch.isfinite(lse).all()  # 0 on the rows that see nothing


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row_lse_low_precision(dtype):
    attn = attention("N40-window-radius-softcap-gqa2")
    rounded = dataclasses.replace(attn, q=attn.q.to(dtype), k=attn.k.to(dtype))
    lse = BACKEND.row_lse(rounded)
    want, seen = oracle_row_lse(attn)
    assert_lowprec_close(lse[seen], want[seen], oracle_row_lse(rounded)[0][seen])


# ---------------------------------------------------------------- key splits (grid axis 2)


@pytest.fixture(params=["one-split", "split-keys"])
def key_split_mode(request, monkeypatch):
    """Every launch's key split count, recorded; "one-split" tells the launchers the query blocks fill the GPU
    (so every launch takes 1 split), "split-keys" leaves the interpreter's H100-sized target (many splits)."""
    counts = []
    choose = kernel_rows.key_splits

    def recorded(programs, key_tiles, device):
        counts.append(choose(programs, key_tiles, device))
        return counts[-1]

    for module in (kernel_rows, attention_pairs, ff_pairs):
        monkeypatch.setattr(module, "key_splits", recorded)
    if request.param == "one-split":
        monkeypatch.setattr(kernel_rows, "programs_to_fill", lambda device: 1)
    yield counts
    assert counts and (max(counts) == 1) == (request.param == "one-split"), counts


def test_key_split_count():
    """Enough splits for FILL_PER_SM programs per SM, none when the query blocks fill the GPU, at most one per
    key tile; rows= of a few rows take the 16-row pair and lse tiles."""
    cpu = torch.device("cpu")
    fill = kernel_rows.programs_to_fill(cpu)
    assert fill == kernel_rows.FILL_PER_SM * kernel_rows.INTERPRETER_SMS
    assert kernel_rows.key_splits(fill, 1000, cpu) == kernel_rows.key_splits(10 * fill, 1000, cpu) == 1
    assert kernel_rows.key_splits(2, 1000, cpu) == fill // 2
    assert kernel_rows.key_splits(2, 7, cpu) == 7
    assert attention_pairs.pair_settings(32, 8)["BLOCK_M"] == 16 < attention_pairs.pair_settings(32, 17)["BLOCK_M"]
    assert kernel_rows.lse_settings(64, 5)["BLOCK_M"] == 16 and kernel_rows.lse_settings(64, 4096)["BLOCK_M"] == 64


# rows of the causal / window / radius / pad pattern: one block whose keys reach over several splits (0 and the
# padded N - 1 among them), and one whose keys (0..2) fit in one tile, so that all other splits see nothing
SPLIT_ROWS = [torch.tensor([96, 0, 48, 32, 48]), torch.tensor([2, 0, 1])]


@pytest.mark.parametrize("rows", SPLIT_ROWS, ids=["spread", "first"])
def test_attention_key_splits(key_split_mode, rows):
    """Maps, alpha, row sums (normalize_rows) and the contraction of selected rows, and the row statistics,
    with keys split over many programs or none, against the oracle."""
    attn = attention("N97-causal-window-radius-softcap-gqa1")
    B, H, N, _ = attn.q.shape
    grams, row_scale = random_grams(B, N, 2, H)
    weights = torch.rand(B, 3, N, generator=torch.Generator().manual_seed(12))
    maps, alpha = BACKEND.attention_maps(attn, grams, row_scale, rows=rows, want_alpha=True)
    assert_close(maps, oracle_attention_maps(attn, grams, row_scale, rows=rows))
    assert_close(alpha, oracle_alpha(attn, rows))
    out, _ = BACKEND.attention_maps(attn, grams, row_scale, rows=rows, weights=weights, normalize_rows=True)
    assert_close(out, oracle_attention_maps(attn, grams, row_scale, rows=rows, weights=weights, normalize_rows=True))
    lse = BACKEND.row_lse(attn)
    want, seen = oracle_row_lse(attn)
    assert_close(lse[seen], want[seen])
    assert (lse[~seen] == 0).all()


def test_ff_key_splits(key_split_mode):
    """The FF row sums (normalize_rows) and contraction with keys split over many programs or none (N = 37:
    10 key tiles of the FF kernel)."""
    attn = random_attention(B=2, H=4, KV=1, N=37, Dh=16, causal=True, window=13, pad=5, radius=6, softcap=1.5,
                            logit_std=3.0)
    parts = random_ff_parts(2, 37, 4, gated=True, n_scopes=3, center=True)
    weights = torch.rand(2, 2, 37, generator=torch.Generator().manual_seed(13))
    for normalize_rows in (False, True):  # normalised, a tile counted twice would cancel out
        kw = dict(rows=torch.tensor([36, 0, 18, 12, 18]), weights=weights, normalize_rows=normalize_rows)
        assert_close(*ff_maps_oracle_pair(attn, parts, **kw))


# ---------------------------------------------------------------- feed-forward maps

# (gated, n_scopes, center)
FF_VARIANTS = [(False, 2, False), (True, 2, False), (False, 3, True), (True, 3, False), (True, 3, True)]


def ff_case(name, gated, n_scopes, center, D=16, F=32, dtype=torch.float32):
    attn = attention(name, dtype=dtype)
    B, H, N, _ = attn.q.shape
    return attn, random_ff_parts(B, N, H, D=D, F=F, gated=gated, n_scopes=n_scopes, center=center)


def ff_maps_oracle_pair(attn, parts, **kw):
    return BACKEND.ff_maps(attn, parts, **kw), oracle_ff_maps(attn, parts, **kw)


@pytest.mark.parametrize("variant", FF_VARIANTS)
@pytest.mark.parametrize("name", ["N1", "N7-causal-pad", "N7-window", "N7-softcap"])
def test_ff_full_map(name, variant):
    attn, parts = ff_case(name, *variant)
    out = BACKEND.ff_maps(attn, parts)
    assert out.shape == (2, variant[1], attn.q.shape[2], attn.q.shape[2])
    assert_close(out, oracle_ff_maps(attn, parts))


@pytest.mark.parametrize("variant", [(True, 3, True), (False, 2, False)])
def test_ff_wide_tiles(variant):
    """Several F and D slices (F = 70, D = 80 are not multiples of the tiles), several key tiles, GQA 4/1."""
    attn, parts = ff_case("N20-H12-dh80", *variant, D=80, F=70)
    assert_close(*ff_maps_oracle_pair(attn, parts))


@pytest.mark.parametrize("name,variant", [("N97-causal-window-gqa1", (True, 3, True)),
                                          ("N97-causal-window-gqa1", (False, 2, False)),
                                          ("N97-radius-pad-gqa2", (True, 3, False))])
def test_ff_rows(name, variant):
    attn, parts = ff_case(name, *variant)
    rows = rows_for(97)
    out, ref = ff_maps_oracle_pair(attn, parts, rows=rows)
    assert out.shape == (2, variant[1], len(rows), 97)
    assert_close(out, ref)


@pytest.mark.parametrize("normalize_rows", [False, True])
@pytest.mark.parametrize("variant", [(True, 3, True), (False, 2, False), (False, 3, False)])
def test_ff_weights_contraction(variant, normalize_rows):
    attn, parts = ff_case("N7-causal-pad", *variant)
    weights = torch.rand(2, 3, 7, generator=torch.Generator().manual_seed(8))
    out, ref = ff_maps_oracle_pair(attn, parts, weights=weights, normalize_rows=normalize_rows)
    assert out.shape == (2, variant[1], 3, 7)
    assert_close(out, ref)


def test_ff_weights_contraction_across_tiles():
    attn, parts = ff_case("N97-causal-window-gqa1", True, 3, True)
    weights = torch.rand(2, 2, 97, generator=torch.Generator().manual_seed(9))
    assert_close(*ff_maps_oracle_pair(attn, parts, weights=weights, normalize_rows=True))


@pytest.mark.parametrize("normalize_rows", [False, True])
@pytest.mark.parametrize("name,variant", [("N7-causal-pad", (True, 3, True)), ("N7-window", (False, 2, False)),
                                          ("N97-causal-window-gqa1", (True, 3, False)),
                                          ("N97-pad-gqa2", (False, 3, True)),
                                          ("N40-window-radius-softcap-gqa2", (True, 3, True))])
def test_ff_weights_contraction_over_selected_rows(name, variant, normalize_rows):
    attn, parts = ff_case(name, *variant)
    N = attn.q.shape[2]
    weights = torch.rand(2, 3, N, generator=torch.Generator().manual_seed(10))
    rows = torch.cat([rows_for(N), torch.tensor([N // 2])])
    out, ref = ff_maps_oracle_pair(attn, parts, rows=rows, weights=weights, normalize_rows=normalize_rows)
    assert out.shape == (2, variant[1], 3, N)
    assert_close(out, ref)


def relative_difference(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", FEATURE_PATTERNS)
def test_radius_and_softcap_change_the_result(name):
    """Each feature moves both primitives (and alpha) far beyond the tolerance of the tests above, so a
    kernel ignoring it fails them; nothing is visible beyond the radius, on either side."""
    attn, parts = ff_case(name, False, 2, False)
    B, H, N, _ = attn.q.shape
    grams, row_scale = random_grams(B, N, 2, H)
    rows = torch.cat([rows_for(N), torch.tensor([N // 4, 3 * N // 4])])  # selected rows: quicker to interpret
    maps, alpha = BACKEND.attention_maps(attn, grams, row_scale, rows=rows, want_alpha=True)
    ff = BACKEND.ff_maps(attn, parts, rows=rows)
    if attn.radius:
        far = (rows[:, None] - torch.arange(N)[None, :]).abs() > attn.radius
        assert (alpha[:, :, far] == 0).all() and (maps[:, :, far] == 0).all() and (ff[:, :, far] == 0).all()
    for feature in ("radius", "softcap"):
        if getattr(attn, feature):
            ignored = dataclasses.replace(attn, **{feature: 0})
            expected = oracle_attention_maps(ignored, grams, row_scale, rows=rows)
            assert relative_difference(maps, expected) > 0.05, feature
            assert relative_difference(alpha, oracle_alpha(ignored, rows)) > 0.05, feature
            assert relative_difference(ff, oracle_ff_maps(ignored, parts, rows=rows)) > 0.05, feature


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ff_low_precision(dtype):
    attn, parts = ff_case("N7-causal-pad", True, 3, True)
    rounded = dataclasses.replace(attn, q=attn.q.to(dtype), k=attn.k.to(dtype))
    lowp = dataclasses.replace(parts, **{f: getattr(parts, f).to(dtype) for f in
                                          ("ff_parts", "gate_parts", "res_parts", "coef_in", "coef_gate", "w_out")})
    assert_lowprec_close(BACKEND.ff_maps(rounded, lowp), oracle_ff_maps(attn, parts), oracle_ff_maps(rounded, lowp))


# ---------------------------------------------------------------- ff_maps streamed over key blocks

STREAM_CASES = {  # (random_attention options, FF variant): N = 13..40 spans 2..5 key tiles of 8 keys
    "N13-causal-window-pad": (dict(H=4, KV=2, N=13, Dh=16, causal=True, window=5, pad=2), (True, 3, True)),
    "N20-H12-dh80-causal-pad": (dict(H=12, KV=3, N=20, Dh=80, causal=True, pad=3), (False, 3, False)),
    "N40-window-radius-softcap-pad": (dict(H=4, KV=2, N=40, Dh=16, window=5, pad=3, radius=8, softcap=1.0,
                                           logit_std=3.0), (False, 2, False)),
}
STREAM_MODES = ["full", "rows", "contract", "contract-normalize", "rows-contract", "rows-contract-normalize"]


def mode_kwargs(mode, N):
    kw = {}
    if mode.startswith("rows"):
        kw["rows"] = torch.cat([rows_for(N), torch.tensor([N // 2])])
    if "contract" in mode:
        kw["weights"] = torch.rand(2, 3, N, generator=torch.Generator().manual_seed(11))
        kw["normalize_rows"] = mode.endswith("normalize")
    return kw


def recording(parts):
    """The same parts made on demand by key_block (as kobattr.core builds them), recording the blocks asked."""
    asked = []

    def key_block(keys):
        asked.append((keys.start, keys.stop))
        return (parts.ff_parts[:, keys], None if parts.gate_parts is None else parts.gate_parts[:, keys],
                parts.res_parts[:, keys])

    return dataclasses.replace(parts, ff_parts=None, gate_parts=None, res_parts=None, key_block=key_block), asked


def launch(attn, parts, key_block_size, rows=None, weights=None, normalize_rows=False):
    """kernels/ff_pairs.py ff_maps called with the whole part tensors, as the backend did before streaming."""
    from kobattr.kernels.ff_pairs import ff_maps

    return ff_maps(ff_parts=parts.ff_parts, gate_parts=parts.gate_parts, res_parts=parts.res_parts,
                   in_scale=parts.in_scale, res_scale=parts.res_scale, out_scale=parts.out_scale,
                   coef_in=parts.coef_in, coef_gate=parts.coef_gate, w_out=parts.w_out, out_weight=parts.out_weight,
                   out_center=parts.out_center, n_scopes=parts.n_scopes, normalize_rows=normalize_rows,
                   key_block_size=key_block_size, **TritonBackend._common(attn, rows, weights))


@pytest.mark.parametrize("mode", STREAM_MODES)
@pytest.mark.parametrize("name", list(STREAM_CASES))
def test_ff_streamed_key_blocks(name, mode):
    """Launches over blocks of one key tile (parts made per block, or sliced from whole tensors) give the
    single-launch result and the fp64 oracle in every output mode; no block is asked for twice per sweep and
    none is wider than a tile."""
    from kobattr.kernels.ff_pairs import ff_settings

    options, (gated, n_scopes, center) = STREAM_CASES[name]
    N = options["N"]
    tile = ff_settings(options["H"])["BLOCK_N"]  # blocks start on key tiles: the smallest block is one tile
    attn = random_attention(B=2, seed=0, **options)
    parts = random_ff_parts(2, N, options["H"], gated=gated, n_scopes=n_scopes, center=center)
    kw = mode_kwargs(mode, N)
    single = launch(attn, parts, None, **kw)
    streamed_backend = TritonBackend()
    streamed_backend.key_block_size = tile
    on_demand, asked = recording(parts)
    streamed = streamed_backend.ff_maps(attn, on_demand, **kw)
    sweeps = 2 if kw.get("normalize_rows") else 1
    assert len(asked) == sweeps * -(-N // tile) and all(stop - start <= tile for start, stop in asked)
    assert sorted(set(asked)) == [(s, min(s + tile, N)) for s in range(0, N, tile)]
    sliced = launch(attn, parts, 2 * tile, **kw)
    ref = oracle_ff_maps(attn, parts, **kw)
    assert streamed.shape == single.shape == ref.shape
    assert_close(streamed, single)
    assert_close(sliced, single)
    assert_close(streamed, ref)


def test_ff_key_block_size_choice():
    """The default block keeps a block's parts under the byte budget, on key tiles, and one block for small N."""
    from kobattr.kernels.ff_pairs import KEY_BLOCK_BYTES, choose_key_block, ff_settings

    bn = ff_settings(32)["BLOCK_N"]
    assert choose_key_block(2, 13, 4, 32, 16, True, 4, bn) == 16
    # Llama-7B: H = 32, F = 11008 (gated), D = 4096, N = 64k, bf16 parts (centred in fp32)
    keys = choose_key_block(1, 65536, 32, 11008, 4096, True, 2, bn)
    assert keys % bn == 0 and 0 < keys < 65536
    assert keys * 33 * (2 * 11008 + 4096) * 4 <= KEY_BLOCK_BYTES
    assert choose_key_block(1, 65536, 32, 11008, 4096, True, 2, bn, budget=1) == bn


# ---------------------------------------------------------------- backend plumbing


def test_non_contiguous_inputs_are_accepted():
    """Inputs in another memory layout reach the kernels in the one they read: with distinct Gram matrices
    per key and method stored method-major, reading the storage as it lies would mix keys and methods up.
    (Transposing a Gram matrix alone cannot show: kappa^T G kappa = kappa^T G^T kappa.)"""
    attn = attention("N7-causal-pad")
    B, H, N, Dh = attn.q.shape
    strided = dataclasses.replace(attn, q=attn.q.transpose(1, 2).contiguous().transpose(1, 2))
    assert not strided.q.is_contiguous()
    grams, row_scale = random_grams(B, N, 3, H)
    maps, _ = BACKEND.attention_maps(strided, scrambled_layout(grams), scrambled_layout(row_scale))
    assert_close(maps, oracle_attention_maps(attn, grams, row_scale))


def test_refusal_reasons():
    attn = attention("N7-causal-pad")
    assert BACKEND.refusals("ff_maps", attn) == []
    every_feature = attention("N97-causal-window-radius-softcap-gqa1")
    assert BACKEND.refusals("attention_maps", every_feature) == BACKEND.refusals("ff_maps", every_feature) == []
    assert BACKEND.refusals("row_stats", every_feature) == []
    too_many_heads = random_attention(B=1, H=65, KV=1, N=3)
    assert any("heads" in reason for reason in BACKEND.refusals("attention_maps", too_many_heads))
    as_double = dataclasses.replace(attn, q=attn.q.double(), k=attn.k.double())
    assert any("float32" in reason for reason in BACKEND.refusals("attention_maps", as_double))
    grams, row_scale = random_grams(1, 3, 1, 65)
    with pytest.raises(BackendUnavailable):
        BACKEND.attention_maps(too_many_heads, grams, row_scale)
    with pytest.raises(BackendUnavailable, match="float32"):
        BACKEND.row_lse(as_double)


def test_unavailable_without_device_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA" in TritonBackend.unavailable_reason()


# ----------------------------------------------------------------------------- ALTI's L1 proximities
@pytest.mark.parametrize("B,K,R,N,D", [(2, 4, 19, 37, 40), (1, 13, 1, 7, 384), (1, 2, 33, 65, 8)])
def test_alti_l1_kernel_equals_the_float64_distances(B, K, R, N, D):
    """kernels/alti_pairs.py against the L1 proximities computed in float64 from the same inputs: partial tiles
    in every dimension, D one chunk, several and partial (384 = 6 x 64), invisible pairs 0."""
    from kobattr.kernels import alti_pairs

    g = torch.Generator().manual_seed(B * K + R + N + D)
    kappa = torch.rand(B, K, R, N, generator=g)
    rows = torch.randn(B, N, K, D, generator=g)
    scale = torch.rand(B, R, generator=g) + 0.5
    y = torch.randn(B, R, D, generator=g) + (kappa.sum(1) @ rows.sum(2) / K) * scale[..., None]  # y near the parts
    vis = torch.rand(B, R, N, generator=g) > 0.2
    norm = y.double().abs().sum(-1)
    got = alti_pairs.alti_l1(kappa, rows, scale, y, norm, vis)
    parts = torch.einsum("bkrn,bnkd->brnd", kappa.double(), rows.double()) * scale.double()[..., None, None]
    expected = (norm[..., None] - (y.double()[:, :, None] - parts).abs().sum(-1)).clamp_min(0) * vis
    assert got.dtype == torch.float64 and (got[~vis] == 0).all() and (expected > 0).any()
    assert (got - expected).abs().max() <= 1e-5 * norm.max()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_alti_through_the_triton_backend_equals_the_reference(kind):
    """attribute(backend="triton") computes ALTI's L1 proximities with the kernel (result.backends says so), the
    L2 variant with torch tiles, both against the float64 reference, padding and causal masks included."""
    from random_layers import random_layer

    from kobattr.core import attribute
    from kobattr.reference import reference

    layer = random_layer(kind, N=11, B=2, pad=3).to(torch.float32)
    res = attribute(layer, methods=["alti", "alti_l2"], backend="triton", budget=1 << 9)
    assert res.backends["peers"] == "triton"
    ref = reference(layer, methods=["alti", "alti_l2"])
    for m in ("alti", "alti_l2"):
        scale = ref["maps"][m].abs().amax(-1, keepdim=True).clamp_min(1e-30)
        assert ((res.maps[m].double() - ref["maps"][m]).abs() / scale).max() < 1e-5, m
    assert res.completeness["alti"].max() < 1e-5
    assert attribute(layer, methods=["alti"], backend="torch").backends["peers"] == "torch"
