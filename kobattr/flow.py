"""Information-flow routes (Ferrando & Voita 2024): the contribution graph of a model's residual stream and the
routes back from a chosen position, as facebookresearch/llm-transparency-tool@f1340f0 builds them
(routes/graph.py GraphBuilder, build_full_graph, build_paths_to_predictions; routes/contributions.py).

Nodes, per layer l and position t (their names): X0_t the embedding, A{l}_t the stream after attention,
M{l}_t the FFN block, I{l}_t the stream after the FFN. Edges: I{l-1}_j -> A{l}_i with the attention block's
proximity share of key j (summed over heads; for j = i the residual's share added, as their multi-edges are
summed), A{l}_t -> M{l}_t -> I{l}_t with the FFN output's share, A{l}_t -> I{l}_t with the residual's share.
Shares: max(EPS, ||whole||_1 - ||whole - part||_1) normalised over the parts (kobattr.peers.flow_attn_map for the
attention block, O(N^2 H d) work and O(N^2) memory; the FFN block's two parts are per token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .peers import FLOW_EPS

DEFAULT_THRESHOLD = 0.04  # the transparency tool's default contribution threshold (server/app.py)


def ffn_shares(states: dict) -> tuple[Tensor, Tensor]:
    """((B, N) FFN output share, (B, N) residual share) of the stream the FFN output joins (their
    get_mlp_contributions): parts ffn_out and the stream, whole ffn_res = their sum."""
    whole, ffn = states["ffn_res"].double(), states["ffn_out"].double()
    parts = torch.stack([ffn, whole - ffn])
    norm = whole.abs().sum(-1)
    prox = (norm - (whole - parts).abs().sum(-1)).clamp_min(FLOW_EPS)
    prox = prox / prox.sum(0)
    return prox[0], prox[1]


@dataclass
class FlowGraph:
    """The information-flow graph of a batch: attn (L, B, N, N) attention-block edges (row i = A{l}_i, column j =
    I{l-1}_j), ffn and residual (L, B, N) the FFN block's shares, tokens per text, attention_mask (B, N)."""

    attn: Tensor
    ffn: Tensor
    residual: Tensor
    tokens: list
    attention_mask: Tensor

    @property
    def n_layers(self) -> int:
        return self.attn.shape[0]

    def edges(self, batch: int = 0) -> list[tuple[str, str, float]]:
        """Every edge (from, to, weight) of text ``batch`` between its real tokens."""
        real = self.attention_mask[batch].nonzero().flatten().tolist()
        out = []
        for layer in range(self.n_layers):
            for i in real:
                for j in real:
                    source = f"I{layer - 1}_{j}" if layer else f"X0_{j}"
                    out.append((source, f"A{layer}_{i}", float(self.attn[layer, batch, i, j])))
                w = float(self.ffn[layer, batch, i])
                out += [(f"A{layer}_{i}", f"M{layer}_{i}", w), (f"M{layer}_{i}", f"I{layer}_{i}", w),
                        (f"A{layer}_{i}", f"I{layer}_{i}", float(self.residual[layer, batch, i]))]
        return out

    def routes(self, position: int, batch: int = 0, threshold: float = DEFAULT_THRESHOLD) -> list[tuple[str, str, float]]:
        """The edges with weight > threshold that lead to I{L-1}_position, the last layer's output at ``position``
        (their build_paths_to_predictions: a depth-first search back from that node)."""
        n = self.attention_mask.shape[1]
        if not (0 <= position < n) or not bool(self.attention_mask[batch, position]):
            raise ValueError(f"position must be a real token of text {batch} in [0, {n}), got {position}.")
        incoming: dict = {}
        for u, v, w in self.edges(batch):
            if w > threshold:
                incoming.setdefault(v, []).append((u, w))
        kept, seen, stack = [], set(), [f"I{self.n_layers - 1}_{position}"]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            for u, w in incoming.get(node, []):
                kept.append((u, node, w))
                stack.append(u)
        return sorted(kept)

    def to_json(self, path, batch: int = 0, position: Optional[int] = None,
                threshold: float = DEFAULT_THRESHOLD) -> Path:
        """Write the graph of text ``batch`` (its edges above ``threshold``, or the route to ``position``) as JSON,
        atomically: {"tokens", "threshold", "position", "nodes", "edges": [[from, to, weight], ...]}."""
        from .result import atomic_write

        edges = (self.routes(position, batch, threshold) if position is not None
                 else [e for e in self.edges(batch) if e[2] > threshold])
        nodes = sorted({n for u, v, _ in edges for n in (u, v)})
        data = dict(tokens=self.tokens[batch], threshold=threshold, position=position, nodes=nodes,
                    edges=[list(e) for e in edges])
        path = Path(path)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data), encoding="utf-8"))
        return path

    def to_networkx(self, batch: int = 0, position: Optional[int] = None, threshold: float = DEFAULT_THRESHOLD):
        """A networkx.DiGraph with "weight" edge attributes (pip install networkx): every edge of text ``batch``, or
        the route to ``position`` above ``threshold``."""
        try:
            import networkx as nx
        except ImportError:
            raise ImportError("to_networkx needs networkx: pip install networkx (or use to_json).") from None
        graph = nx.DiGraph()
        edges = self.routes(position, batch, threshold) if position is not None else self.edges(batch)
        graph.add_weighted_edges_from(edges)
        return graph


def flow_routes(model, inputs, tokenizer=None, max_length: Optional[int] = None, backend="auto",
                verify: int = 2) -> FlowGraph:
    """The information-flow graph of ``model`` on ``inputs`` (a text, texts with ``tokenizer``, or a tokenizer
    batch), every layer: the attention edges are the registered method ``flow_attn`` (spot-checked against the
    reference with ``verify`` rows per layer), the FFN edges come from the layer's own hidden states."""
    from .api import _tokenize, _tokens
    from .core import attribute
    from .models import capture

    batch = _tokenize(inputs, tokenizer, max_length)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
    attn, ffn, res = [], [], []

    def on_layer(index, layer):
        result = attribute(layer, methods=["flow_attn"], backend=backend, verify=verify, verify_seed=index)
        attn.append(result.maps["flow_attn"].cpu())
        f, r = ffn_shares(layer.forward())
        valid = layer.valid
        ffn.append((f * valid).cpu())
        res.append((r * valid).cpu())

    capture(model, batch, on_layer)
    return FlowGraph(attn=torch.stack(attn), ffn=torch.stack(ffn), residual=torch.stack(res),
                     tokens=_tokens(batch["input_ids"], tokenizer), attention_mask=mask.cpu())
