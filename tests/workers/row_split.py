"""A torchrun worker for tests/test_distributed.py: one long text split by query rows over the ranks.

Usage: row_split.py TEXT_FILE CONTRACT_PT OUT_DIR. Writes OUT_DIR/maps/rows-*-of-*.safetensors (full maps, one row
block per rank) and OUT_DIR/contracted/contracted.safetensors (the summed contraction, from rank 0); each rank also
writes OUT_DIR/rank<r>.json with what it returned (its rows, and whether its contracted result equals rank 0's)."""

import json
import os
import sys
from pathlib import Path

import torch

from kobattr.distributed import analyze_rows
from kobattr.models import load_default_model

METHODS = ["attnresln_n", "atbffresln"]
LAYERS = [0, 5]


def main(text_file: str, contract_file: str, out_dir: str) -> None:
    model, tokenizer = load_default_model()
    text = Path(text_file).read_text(encoding="utf-8")
    contract = torch.load(contract_file)
    out = Path(out_dir)
    own = analyze_rows(model, text, tokenizer=tokenizer, out_dir=out / "maps", methods=METHODS, layers=LAYERS,
                       verify=1)
    summed = analyze_rows(model, text, tokenizer=tokenizer, out_dir=out / "contracted", methods=METHODS,
                          layers=LAYERS, contract=contract, verify=1)
    rank = int(os.environ.get("RANK", "0"))
    torch.save({m: summed.maps[m] for m in METHODS}, out / f"contracted-rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"rows": own.rows.tolist()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
