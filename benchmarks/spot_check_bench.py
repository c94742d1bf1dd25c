"""What the spot checks cost: verify=0 vs verify=2, side by side in one process.

    python benchmarks/spot_check_bench.py [--sizes 2048 4096] [--methods attnresln_n] [--repeats 3]
                                          [--analyze-layers 12]

Two measurements per N: ``attribute()`` on the BERT-base-shaped layer of benchmarks/run.py (H=12,
d=768, d_ff=3072, batch 1, fp32) for each --methods entry (comma-separated names run together), and
``analyze()`` with its default methods on a randomly initialised BERT-base model (--analyze-layers
layers, 0 skips it). Each configuration is timed ``--repeats`` times, alternating with and without the
check, and the best kept; as that difference is at the level of this shared machine's noise, the time
spent inside the spot checks of one run is also measured directly ("checks s", "share" of the run). The spot check recomputes k sampled query rows per layer and text with the
float64 reference (k x N x d materialised), so its cost grows like N while the maps grow like N^2: the
goal is under 5% of analyze() at N >= 2048. Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from run import build_layer

from kobattr import verify
from kobattr.api import analyze
from kobattr.core import attribute


def best_times(plain, checked, repeats: int) -> tuple[float, float]:
    """Best of ``repeats`` runs of each, alternating, so that a slow spell of the machine hits both."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((plain, checked)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def bert_base_model(n_layers: int, n_positions: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=n_layers, max_position_embeddings=n_positions)  # BERT-base sizes
    return BertModel(config).eval()


class CheckTimer:
    """Times every kobattr.verify.spot_check call: the checks' own seconds, free of run-to-run noise."""

    def __init__(self):
        self.seconds = 0.0
        self.original = verify.spot_check
        verify.spot_check = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def report(rows: list, what: str, N: int, k: int, plain: float, checked: float, check_seconds: float, result) -> None:
    overhead, share = checked / plain - 1, check_seconds / plain
    rows.append(dict(what=what, N=N, k=k, seconds_plain=plain, seconds_checked=checked, overhead=overhead,
                     seconds_in_checks=check_seconds, checks_share=share, backends=result.backends,
                     max_error={m: float(e.max()) for m, e in result.spot_check.items()}))
    used = result.backends[0] if isinstance(result.backends, list) else result.backends
    print(f"{what:<44} {N:>6} {plain:>11.3f} {checked:>11.3f} {100 * overhead:>8.1f}% {check_seconds:>9.3f} "
          f"{100 * share:>7.1f}%  {used}")


def measured(run, k: int, repeats: int) -> tuple:
    """(best seconds without checks, best with, seconds inside the checks of one run, that run's result)."""
    plain, checked = best_times(lambda: run(0), lambda: run(k), repeats)
    timer = CheckTimer()
    try:
        result = run(k)
    finally:
        verify.spot_check = timer.original
    return plain, checked, timer.seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--methods", nargs="+", default=["attnresln_n"])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--analyze-layers", type=int, default=12)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "spot_check.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'what':<44} {'N':>6} {'verify=0 s':>11} {f'verify={args.k} s':>11} {'overhead':>9} {'checks s':>9} "
          f"{'share':>8}  backends")
    for N in args.sizes:
        layer = build_layer(N, "cpu")
        for methods in args.methods:
            names = methods.split(",")
            run = lambda verify: attribute(layer, methods=names, backend=args.backend, verify=verify)  # noqa: E731
            report(rows, f"attribute {methods}", N, args.k, *measured(run, args.k, args.repeats))
        if args.analyze_layers:
            model = bert_base_model(args.analyze_layers, N)
            batch = {"input_ids": torch.randint(1000, 20000, (1, N), generator=torch.Generator().manual_seed(0))}
            run = lambda verify: analyze(model, batch, backend=args.backend, verify=verify)  # noqa: E731
            report(rows, f"analyze BERT-base x{args.analyze_layers} (default methods)", N, args.k,
                   *measured(run, args.k, args.repeats))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(machine=platform.machine(), processor=platform.processor(),
                                              threads=torch.get_num_threads(), torch=torch.__version__, rows=rows),
                                         indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
