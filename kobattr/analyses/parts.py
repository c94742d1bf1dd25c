"""Sums of per-batch statistics that come out the same on one process and on the ranks of torchrun:
`kobattr heads` under torchrun (head statistics, gradient importance, coreference heads, head clustering).

An analysis reduces every batch to a *state*: a nested dict of float64 / int64 tensors, Python numbers, lists,
sets, :class:`Max` and :class:`Fixed` values, combined by :func:`add` (tensors and numbers add, lists
concatenate, sets unite, Max keeps the larger, Fixed must agree, dicts combine key by key). Floating-point
addition is not associative, so the batch states are always summed along one fixed binary tree over the batch
indices (node (level, i) = batches i * 2^level .. (i + 1) * 2^level - 1, a node = its left child + its right
child; the whole = the maximal nodes of 0..n-1 from left to right, as a binary counter keeps them), whatever
the number of ranks: each rank streams its contiguous block of batches into the complete nodes inside it
(at most 2 log2 n of them), writes them as its part, and rank 0 rebuilds the missing upper nodes from the
parts with the same additions. The batches themselves are the same as on one process (the same texts padded
together), so the merged statistics, and results.json, are identical bit for bit to a single-process run.

Part files: ``<parts>/<name>-rank<r>-of-<size>.safetensors``, written atomically (kobattr.io); the tensors are
the file's tensors, the structure a JSON header (Python floats as their shortest repr, which reads back
exactly).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from ..distributed import World, row_blocks, world
from ..io import write_safetensors

FORMAT = "kobattr-batch-sums-1"


class Fixed:
    """A value every batch must agree on (layers, head count); kept once."""

    def __init__(self, value):
        self.value = json.loads(json.dumps(value))  # the form it has after a part file (tuples become lists)

    def __eq__(self, other):
        return isinstance(other, Fixed) and self.value == other.value


class Max:
    """A value combined by its maximum (the worst spot-check error)."""

    def __init__(self, value: float):
        self.value = value


def add(a, b):
    """The combination of two states (see the module docstring); ``a`` is the earlier batches'."""
    if isinstance(a, Tensor):
        return a + b
    if isinstance(a, dict):
        out = dict(a)
        for key, value in b.items():
            out[key] = add(a[key], value) if key in a else value
        return out
    if isinstance(a, list):
        return a + b
    if isinstance(a, set):
        return a | b
    if isinstance(a, Max):
        return Max(max(a.value, b.value))
    if isinstance(a, Fixed):
        if a != b:
            raise ValueError(f"batches disagree on a fixed value ({a.value!r} vs {b.value!r}).")
        return a
    return a + b


class PairwiseSum:
    """The complete tree nodes of the batches added so far (in increasing batch order, any start)."""

    def __init__(self):
        self.nodes: dict = {}

    def add(self, index: int, state) -> None:
        level = 0
        while index & 1 and (level, index - 1) in self.nodes:  # a right child completes its parent
            state = add(self.nodes.pop((level, index - 1)), state)
            level, index = level + 1, index >> 1
        self.nodes[(level, index)] = state


def total(nodes: dict, n_batches: int):
    """The sum of batches 0..n_batches-1 from tree nodes (a single run's, or every rank's together)."""
    def node(level: int, index: int):
        if (level, index) in nodes:
            return nodes[(level, index)]
        if level == 0:
            raise ValueError(f"batch {index} is in no part; every rank's part must be there.")
        return add(node(level - 1, 2 * index), node(level - 1, 2 * index + 1))

    out, start = None, 0
    for level in reversed(range(n_batches.bit_length())):
        if n_batches >> level & 1:
            part = node(level, start >> level)
            out = part if out is None else add(out, part)
            start += 1 << level
    return out


# ------------------------------------------------------------------------------------------ part files
def _encode(value, tensors: dict):
    if isinstance(value, Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, list):
        return {"list": [_encode(v, tensors) for v in value]}
    if isinstance(value, set):
        return {"set": sorted(value)}
    if isinstance(value, Max):
        return {"max": value.value}
    if isinstance(value, Fixed):
        return {"fixed": value.value}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"a batch state cannot hold a {type(value).__name__}.")


def _decode(tree, tensors: dict):
    (kind, value), = tree.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: _decode(v, tensors) for k, v in value}
    if kind == "list":
        return [_decode(v, tensors) for v in value]
    if kind == "set":
        return set(value)
    if kind == "max":
        return Max(value)
    if kind == "fixed":
        return Fixed(value)
    return value


def part_path(parts: Path, name: str, rank: int, size: int) -> Path:
    return Path(parts) / f"{name}-rank{rank:05d}-of-{size:05d}.safetensors"


def write_part(path: Path, nodes: dict, name: str, n_batches: int) -> None:
    """One rank's tree nodes as a safetensors file, atomically."""
    tensors: dict = {}
    header = [[level, index, _encode(state, tensors)] for (level, index), state in nodes.items()]
    write_safetensors(path, tensors, {"format": FORMAT, "name": name, "batches": str(n_batches),
                                      "nodes": json.dumps(header)})


def read_part(path: Path, name: str, n_batches: int) -> dict:
    """The tree nodes of one part file; ValueError when it is of another analysis or batch count."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta.get("format") != FORMAT or meta.get("name") != name or meta.get("batches") != str(n_batches):
        raise ValueError(f"{path} is not a part of this run's {name} ({n_batches} batches).")
    return {(level, index): _decode(tree, tensors) for level, index, tree in json.loads(meta["nodes"])}


# ---------------------------------------------------------------------------------------------- driver
def batch_sum(n_batches: int, leaf: Callable[[int], object], parts: Optional[Path] = None, name: str = "sums",
              progress: bool = False, desc: str = "batches"):
    """The sum (module docstring) of ``leaf(k)``, the state of batch k, over k = 0..n_batches-1.

    Without ``parts``, or outside torchrun: every batch here. With ``parts`` (a directory every rank can write)
    under torchrun: this rank's contiguous block of batches, its part written to ``parts``, and once every
    rank's part is there rank 0 returns the sum and the other ranks None. The progress bar is rank 0's
    (over its own block)."""
    from tqdm.auto import tqdm

    here = world() if parts is not None else World()
    start, stop = row_blocks(n_batches, here.size)[here.rank]
    label = desc if here.size == 1 else f"{desc} (rank 0's share of {here.size})"
    tree = PairwiseSum()
    for k in tqdm(range(start, stop), desc=label, disable=not progress or not here.main, file=sys.stderr):
        tree.add(k, leaf(k))
    if here.size == 1:
        return total(tree.nodes, n_batches)
    Path(parts).mkdir(parents=True, exist_ok=True)
    write_part(part_path(parts, name, here.rank, here.size), tree.nodes, name, n_batches)
    here.wait_for_all()
    if not here.main:
        return None
    nodes: dict = {}
    for rank in range(here.size):
        nodes.update(read_part(part_path(parts, name, rank, here.size), name, n_batches))
    return total(nodes, n_batches)
