"""Work shared over torch.distributed ranks: texts of a corpus (kobattr.analyses.corpus) and query rows of one
long text (analyze_rows, load_row_shards).

Launch with torchrun (``torchrun --nproc-per-node=K``, ``--nnodes`` for several machines, or under SLURM): kobattr
joins the process group torchrun describes (NCCL when CUDA is available, each rank on ``cuda:LOCAL_RANK``; gloo
on CPU), or uses the one you initialised yourself. Without torchrun (no WORLD_SIZE above 1) everything runs in
this process as a world of one, with no process group.

Row split: query rows are independent given the per-key parts, so each rank runs the model forward, computes the
per-key parts of every key itself and attributes only its contiguous block of query rows
(``analyze(..., rows=block)``). Full maps are written as one row-block file per rank; a contraction
``R @ map`` is a sum over row blocks (``analyze`` contracts over the selected rows, R indexed by the absolute
row), so the ranks' partial contractions are summed by an all-reduce. Per-token outputs (ratios, bias norms)
are gathered from each rank's own block.
"""

from __future__ import annotations

import atexit
import datetime
import os
import pickle
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .layer import LayerInputError

# How long a rank may wait for the others at a collective (process groups kobattr creates): the ranks of a
# corpus run meet only at its end, and the slowest may still have a few shards to go.
WAIT_TIMEOUT = datetime.timedelta(hours=12)
ROW_SHARD = re.compile(r"rows-(\d+)-of-(\d+)\.safetensors")


class StoppedOnRankZero(RuntimeError):
    """Raised on the other ranks when World.agree's computation failed on rank 0 (which raises the error itself);
    ``error`` is rank 0's exception."""

    def __init__(self, error: BaseException):
        super().__init__(f"rank 0 stopped: {error}")
        self.error = error


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: rank, size, the device its work runs on, and small collectives
    that are no-ops in a world of one."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def agree(self, compute: Callable[[], object]):
        """``compute()`` on rank 0 and its value on every rank; an exception there is raised by rank 0 and, as
        StoppedOnRankZero, by every other rank (so that no rank waits for a rank that has stopped)."""
        if self.size == 1:
            return compute()
        failed, value = False, None
        if self.main:
            try:
                value = compute()
            except Exception as err:
                failed, value = True, err
                try:
                    pickle.dumps(err)
                except Exception:
                    value = RuntimeError(f"{type(err).__name__}: {err}")
        box = [(failed, value)]
        dist.broadcast_object_list(box, src=0, device=self._collective_device())
        failed, value = box[0]
        if failed:
            raise value if self.main else StoppedOnRankZero(value)
        return value

    def wait_for_all(self, while_waiting: Optional[Callable[[], None]] = None, interval_s: float = 0.5) -> None:
        """A barrier; ``while_waiting()`` runs every ``interval_s`` until every rank has arrived."""
        if self.size == 1:
            return
        work = dist.barrier(async_op=True)
        while not work.is_completed():
            if while_waiting is not None:
                while_waiting()
            time.sleep(interval_s)
        work.wait()

    def reduce(self, tensor: Tensor, op: str) -> Tensor:
        """The elementwise "sum" or "max" of ``tensor`` over the ranks (on its own device and dtype)."""
        if self.size == 1:
            return tensor
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        work = tensor.detach().to(self._collective_device()).contiguous()
        dist.all_reduce(work, op=ops[op])
        return work.to(tensor.device)

    def gather_blocks(self, block: Tensor, blocks: list[tuple[int, int]]) -> Tensor:
        """The ranks' blocks of the last dimension, concatenated: rank r holds columns blocks[r] of the whole."""
        if self.size == 1:
            return block
        width = max(stop - start for start, stop in blocks)
        padded = torch.zeros(*block.shape[:-1], width, dtype=block.dtype, device=self._collective_device())
        padded[..., :block.shape[-1]] = block
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[..., :stop - start] for p, (start, stop) in zip(parts, blocks)], -1).to(block.device)


def _device(local_rank: int) -> torch.device:
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def world() -> World:
    """The World of this process: the process group already initialised, or the one torchrun describes (joined
    on first use and kept until the process exits: a group cannot be joined twice under one rendezvous), or a
    world of one."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(local_rank)
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), local_rank, device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World(device=device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE is above 1 but this torch build has no torch.distributed.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=WAIT_TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))
    atexit.register(dist.destroy_process_group)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


# ------------------------------------------------------------------------------------------ one long text
def row_blocks(n_rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, stop) blocks covering rows 0..n_rows-1, sizes differing by at most one."""
    return [(r * n_rows // parts, (r + 1) * n_rows // parts) for r in range(parts)]


def _token_count(model, inputs, tokenizer, max_length) -> int:
    """The number of query rows analyze() will see for one text (a string, or a batch of one)."""
    if isinstance(inputs, str):
        if tokenizer is None:
            raise LayerInputError("text inputs need a tokenizer: analyze_rows(model, text, tokenizer=tokenizer).")
        return len(tokenizer(inputs, truncation=max_length is not None, max_length=max_length)["input_ids"])
    if hasattr(inputs, "keys") and "input_ids" in inputs and isinstance(inputs["input_ids"], Tensor):
        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise LayerInputError(f"analyze_rows takes one text; got input_ids of shape {tuple(ids.shape)} "
                                  "(a corpus of texts goes to kobattr.analyses.corpus.run_corpus).")
        return ids.shape[1]
    raise LayerInputError("analyze_rows takes one text (a string with tokenizer=) or a tokenizer batch of one text.")


def analyze_rows(model, inputs, tokenizer=None, out_dir=None, methods=None, layers=None, contract=None,
                 backend="auto", verify: int = 2, max_length: Optional[int] = None):
    """One long text attributed by all ranks together, each computing a contiguous block of query rows.

    inputs: a text (with ``tokenizer``) or a tokenizer batch of one text. Without ``contract``: every rank gets
    the Attribution of its own rows (``result.rows``) and, with ``out_dir``, writes it to
    ``out_dir/rows-<rank>-of-<size>.safetensors`` (``load_row_shards`` puts the full maps together). With
    ``contract`` ((K, N), as for analyze): the ranks' partial contractions are summed, and every rank gets the
    whole contracted Attribution (rank 0 writes it to ``out_dir/contracted.safetensors``). With ``out_dir`` it
    returns once every rank has written. Either way ratios and bias norms are gathered from each rank's block
    of tokens, and completeness, model error and spot-check errors are the worst over the ranks. The model must
    sit on this rank's device (``world().device``).
    """
    from .api import analyze

    here = world()
    n = _token_count(model, inputs, tokenizer, max_length)
    if n < here.size:
        raise LayerInputError(f"the text has {n} tokens, fewer than the {here.size} ranks; run it on at most "
                              f"{n} ranks.")
    blocks = row_blocks(n, here.size)
    start, stop = blocks[here.rank]
    result = analyze(model, inputs, tokenizer=tokenizer, methods=methods, layers=layers,
                     rows=range(start, stop), contract=contract, backend=backend, verify=verify,
                     max_length=max_length)

    def gathered(per_token: dict) -> dict:
        return {m: here.gather_blocks(t[..., start:stop], blocks) for m, t in per_token.items()}

    def worst(per_layer: dict) -> dict:
        return {m: here.reduce(t, "max") for m, t in per_layer.items()}

    result = replace(result, ratios=gathered(result.ratios), bias_norms=gathered(result.bias_norms),
                     completeness=worst(result.completeness), spot_check=worst(result.spot_check),
                     model_error=None if result.model_error is None else here.reduce(result.model_error, "max"))
    if contract is not None:
        result = replace(result, maps={m: here.reduce(t, "sum") for m, t in result.maps.items()}, rows=None)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if contract is None:
            result.save(out / f"rows-{here.rank:05d}-of-{here.size:05d}.safetensors")
        elif here.main:
            result.save(out / "contracted.safetensors")
        here.wait_for_all()  # on return every rank's file is there (load_row_shards may follow at once)
    return result


def load_row_shards(out_dir):
    """The full-map Attribution from the row-block files analyze_rows wrote into ``out_dir``: maps concatenated
    along the query rows (in memory: L x N x N per method). ValueError when blocks are missing or overlap."""
    from .result import Attribution

    out = Path(out_dir)
    found = sorted((int(m.group(1)), int(m.group(2)), p) for p in out.glob("rows-*-of-*.safetensors")
                   if (m := ROW_SHARD.fullmatch(p.name)))
    if not found:
        raise FileNotFoundError(f"{out} holds no row-block files (rows-<rank>-of-<ranks>.safetensors).")
    sizes = {size for _, size, _ in found}
    if len(sizes) != 1 or [rank for rank, _, _ in found] != list(range(found[0][1])):
        raise ValueError(f"{out} holds row blocks {[p.name for _, _, p in found]}, not one block of each rank of one "
                         "run; write each run into its own directory.")
    parts = [Attribution.load(p) for _, _, p in found]
    n = parts[0].attention_mask.shape[1]
    rows = torch.cat([part.rows for part in parts])
    if not torch.equal(rows, torch.arange(n)):
        raise ValueError(f"the row blocks in {out} cover rows {rows.tolist()[:8]}..., not 0..{n - 1} once each.")
    return replace(parts[0], maps={m: torch.cat([part.maps[m] for part in parts], 2) for m in parts[0].methods},
                   rows=None, spot_check={m: torch.stack([part.spot_check[m] for part in parts]).amax(0)
                                          for m in parts[0].spot_check})
