"""Head clustering (Clark et al. 2019, section 6, Fig. 6): Jensen-Shannon distances between all heads, 2-D MDS.

D(a, b) = sum over texts and query tokens i of JS(P_a(.|i), P_b(.|i)) over the L*H analysed heads, on token-level
maps, specials included and padding excluded. Each row is smoothed to p' = 0.999 p + 0.001 / T (T: the text's
real tokens) and JS(p', q') = 1/2 KL(p' || m) + 1/2 KL(q' || m), m = (p' + q') / 2, natural log (the released
code, clarkkev/attention-analysis@b609cfc head_distances.py). It is a sum, as the authors' code computes it; the
result also holds the token count and mean = D / tokens, on which :func:`mds` runs. Weights: alpha^h rows as they
are; norms: ||alpha^h_ij f^h(x_j)|| rows normalised to sum 1 (an all-zero row becomes uniform) before the
smoothing. Definitions: shared/spec/clark2019.md section 4, docs/methods.md section 9.

Memory: the maps are streamed per batch and per block of R query rows (kobattr.analyze(rows=...)): at most
L*H*B*R*N map values are held at once (with R = max(1, max_elements // (L*H*B*N))), never L x H x N x N for long
N; each block is one forward pass through the analysed layers. The pairwise sums need the K = L*H maps of the
block side by side (K x r x n per text, plus one K x r x n temporary).

MDS: scikit-learn's metric SMACOF on the precomputed means (optional extra: pip install kobattr[clustering]),
with the 1.8+ argument names, init="random", n_init=5, max_iter=1000, eps=1e-10 and a fixed random_state, so
it is deterministic (the authors' call had no random_state).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..layer import LayerInputError
from .heads import KINDS, _batch, _encode

SMOOTHING = 0.001
DEFAULT_MAX_ELEMENTS = 1 << 24


def smooth(p: Tensor, smoothing: float = SMOOTHING) -> Tensor:
    """Rows of ``p`` (..., T) as the released code smooths them: (1 - s) p + s / T."""
    return (1 - smoothing) * p + smoothing / p.shape[-1]


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """JS(p, q) per row (natural log) of distributions on the last axis, without smoothing: (...,)."""
    m = (p + q) / 2
    return 0.5 * (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(-1) + \
        0.5 * (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(-1)


def _normalize_rows(t: Tensor) -> Tensor:
    """Rows divided by their sums; an all-zero row becomes uniform."""
    total = t.sum(-1, keepdim=True)
    return torch.where(total > 0, t / torch.where(total > 0, total, torch.ones_like(total)), 1.0 / t.shape[-1])


def pairwise_js(P: Tensor) -> Tensor:
    """(K, K) sum over rows of JS between every two of the K row-stochastic maps P (K, r, n), already smoothed.

    JS(p, q) = 1/2 sum p ln p + 1/2 sum q ln q - sum m ln m: the entropies once per map, the cross term per pair."""
    P = P.double()
    K = P.shape[0]
    negent = torch.special.xlogy(P, P).sum((1, 2))  # (K,)
    out = torch.zeros(K, K, dtype=torch.float64)
    for a in range(K):
        m = (P[a] + P[a:]) / 2  # (K - a, r, n)
        out[a, a:] = 0.5 * negent[a] + 0.5 * negent[a:] - torch.special.xlogy(m, m).sum((1, 2))
    out = torch.triu(out, 1)
    return (out + out.T).clamp(min=0)  # JS >= 0; the clamp only removes rounding below zero


def head_distances(model, tokenizer, texts: Sequence[str], layers: Optional[Sequence[int]] = None,
                   kinds: Sequence[str] = KINDS, batch_size: int = 8, backend="auto", max_length: Optional[int] = None,
                   progress: bool = False, max_elements: int = DEFAULT_MAX_ELEMENTS, verify: int = 2,
                   parts: Optional[Path] = None) -> Optional[dict]:
    """The JS distance matrix D over all analysed heads (module docstring) for each kind: {"sum", "mean"} (K x K,
    K = L*H, head k = layer index * H + head), beside the token count, texts and labels (JSON types).

    Streams batches of ``batch_size`` texts and blocks of query rows so that at most ``max_elements`` map
    values per kind are held (module docstring). parts: a directory all ranks can write; under torchrun the
    ranks then share the batches (contiguous blocks; each batch's sums start from zero and are summed along
    kobattr.analyses.parts' fixed tree), and rank 0 returns the result (identical to a single-process run's;
    add_mds after it), the other ranks None."""
    from .parts import Fixed, Max, batch_sum
    from ..api import _wanted_layers, analyze
    from ..models import get_adapter
    from ..reproduce import _model_name

    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise LayerInputError("no texts to cluster heads on.")
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise LayerInputError(f"kinds must be a non-empty selection of {', '.join(KINDS)}, got {kinds!r}.")
    for name, value in (("batch_size", batch_size), ("max_elements", max_elements)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayerInputError(f"{name} must be a positive int, got {value!r}.")
    adapter = get_adapter(model)
    wanted = _wanted_layers(layers, len(adapter.layer_modules(model)))
    # the head count bounds the block before the first maps tell it (1 where the config does not say)
    H = getattr(model.config, "num_attention_heads", None) or 1
    method = {"weights": "attn_w", "norms": "attn_n"}
    batches = [texts[k:k + batch_size] for k in range(0, len(texts), batch_size)]

    def leaf(k: int) -> dict:
        sums: dict = {}
        tokens = 0
        worst_spot = 0.0
        used_backends: set = set()
        heads = H
        batch, _ = _batch([_encode(t, tokenizer, max_length) for t in batches[k]], tokenizer)
        mask = batch["attention_mask"].bool()
        B, N = mask.shape
        R = max(1, max_elements // (len(wanted) * H * B * N))
        for start in range(0, N, R):
            block = list(range(start, min(N, start + R)))
            result = analyze(model, batch, tokenizer=tokenizer, methods=[method[k] for k in kinds], heads=True,
                             layers=wanted, rows=block, backend=backend, verify=verify)
            used_backends |= {f"{p}={name}" for per_layer in result.backends for p, name in per_layer.items()}
            worst_spot = max([worst_spot] + [e.max().item() for e in result.spot_check.values()])
            for b in range(B):
                keys = mask[b].nonzero().flatten()
                rows = torch.tensor([r for r, i in enumerate(block) if mask[b, i]], dtype=torch.long)
                if len(rows) == 0:
                    continue
                for kind in kinds:
                    m = result.head_maps[method[kind]][:, b][:, :, rows][:, :, :, keys].double()  # (L, H, r, n)
                    heads = m.shape[1]
                    if kind == "norms":
                        m = _normalize_rows(m)
                    D = pairwise_js(smooth(m.flatten(0, 1)))
                    sums[kind] = D if kind not in sums else sums[kind] + D
                tokens += len(rows)
            del result
        return {"sums": sums, "tokens": tokens, "heads": Fixed(heads), "backends": used_backends,
                "worst_spot": Max(worst_spot)}

    summed = batch_sum(len(batches), leaf, parts=parts, name="clustering", progress=progress,
                       desc="clustering: batches")
    if summed is None:  # another rank than 0 of a shared run
        return None
    sums, tokens, H = summed["sums"], summed["tokens"], summed["heads"].value
    used_backends, worst_spot = summed["backends"], summed["worst_spot"].value
    labels = [f"{i + 1}-{h + 1}" for i in wanted for h in range(H)]
    out = {"model": {"name": _model_name(model), "family": adapter.family, "causal": adapter.causal},
           "layers": [i + 1 for i in wanted], "heads": H, "labels": labels, "texts": len(texts), "tokens": tokens,
           "smoothing": SMOOTHING, "kinds": list(kinds)}
    for kind in kinds:
        out[kind] = {"sum": sums[kind].tolist(), "mean": (sums[kind] / max(tokens, 1)).tolist()}
    out["backends"] = ", ".join(sorted(used_backends))
    out["worst_spot_check_error"] = worst_spot
    return out


def mds(distances, random_state: int = 0):
    """2-D metric MDS coordinates (K, 2) of a precomputed K x K dissimilarity matrix, scikit-learn's SMACOF with the
    arguments of the module docstring."""
    import numpy as np

    try:
        from sklearn.manifold import MDS
    except ImportError:
        raise ImportError("head clustering's MDS needs scikit-learn: pip install kobattr[clustering].") from None
    d = np.asarray(distances, dtype=float)
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 2:
        raise ValueError(f"distances must be a square matrix of at least 2 x 2, got shape {d.shape}.")
    if not np.isfinite(d).all() or (d < 0).any() or not np.allclose(d, d.T):
        raise ValueError("distances must be finite, non-negative and symmetric.")
    model = MDS(n_components=2, metric="precomputed", metric_mds=True, init="random", n_init=5, max_iter=1000,
                eps=1e-10, normalized_stress=False, random_state=random_state)
    return model.fit_transform(d)


def add_mds(result: dict, random_state: int = 0) -> dict:
    """``result`` (head_distances) with result["mds"][kind] = mds(result[kind]["mean"]) as lists; returns it."""
    result["mds"] = {k: mds(result[k]["mean"], random_state=random_state).tolist() for k in result["kinds"]}
    result["mds_random_state"] = random_state
    return result


# ----------------------------------------------------------------------------------------------- output
def plot(result: dict, path) -> Path:
    """The MDS scatter (one panel per kind, weights and norms side by side), each head a point coloured by its
    layer and labelled layer-head; adds the coordinates to ``result`` first if they are missing."""
    import numpy as np
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    from .heads import _save

    if "mds" not in result:
        add_mds(result)
    kinds = result["kinds"]
    layers = result["layers"]
    H = result["heads"]
    layer_of = np.repeat(np.arange(len(layers)), H)
    norm = colors.Normalize(vmin=0, vmax=max(len(layers) - 1, 1))
    fig = Figure(figsize=(5.2 * len(kinds) + 0.8, 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(kinds)))
    for ax, kind in zip(axes, kinds):
        xy = np.asarray(result["mds"][kind])
        ax.scatter(xy[:, 0], xy[:, 1], c=layer_of, cmap="viridis", norm=norm, s=22)
        if len(xy) <= 200:
            for (x, y), label in zip(xy, result["labels"]):
                ax.annotate(label, (x, y), fontsize=5, alpha=0.7, xytext=(2, 2), textcoords="offset points")
        ax.set_title(f"heads by JS distance ({kind})")
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=list(axes), label="layer")
    bar.set_ticks(range(len(layers)), labels=[str(layer) for layer in layers])
    path = Path(path)
    _save(fig, path)
    return path


def summary_lines(result: dict) -> list[str]:
    """A few lines for the CLI: the size, and per kind the mean distance between heads of one layer and of
    different layers."""
    import numpy as np

    H, L = result["heads"], len(result["layers"])
    lines = [f"clustering: {L * H} heads, {result['texts']} texts, {result['tokens']} query tokens"]
    block = np.kron(np.eye(L), np.ones((H, H))).astype(bool)
    same, across = block & ~np.eye(L * H, dtype=bool), ~block
    for kind in result["kinds"]:
        d = np.asarray(result[kind]["mean"])
        mean = lambda sel: d[sel].mean() if sel.any() else float("nan")  # noqa: E731
        lines.append(f"  {kind}: mean JS per token between heads of one layer {mean(same):.3f}, "
                     f"of different layers {mean(across):.3f}")
    return lines


def figures(result: dict, out: Path) -> dict:
    """clustering.png (the MDS plot) in ``out``."""
    plot(result, Path(out) / "clustering.png")
    return {"clustering": "clustering.png"}


def report_lines(result: dict, written: dict) -> list[str]:
    """The report.md section."""
    lines = ["## Head clustering (Clark et al. 2019, section 6)", "",
             f"Jensen-Shannon distance between every two of the {len(result['labels'])} heads, summed over "
             f"{result['tokens']} query tokens of {result['texts']} texts (rows smoothed 0.999 p + 0.001 / T; norms "
             "row-normalised first), divided by the token count, embedded in 2-D by metric MDS (random_state "
             f"{result.get('mds_random_state', 0)}). The matrices and coordinates are in results.json.", ""]
    if "clustering" in written:
        lines += [f"![clustering]({written['clustering']})", ""]
    lines += [f"- {line.strip()}" for line in summary_lines(result)[1:]]
    return lines + [""]
