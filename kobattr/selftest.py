"""``kobattr selftest``: every available implementation against the reference on this machine's device.

Each implementation runs the primitives it implements on small random layers of every block structure
(kobattr.testing), with each attention feature (padding, causal, windows, GQA, soft-capping) in turn,
in float32 and, on a GPU, float16 and bfloat16. Its maps are compared with the materialising reference
in float64 by the spot checks' row error (kobattr.verify.row_errors), the row log-sum-exp of row_stats
by its absolute error, and held to the spot checks' tolerance for the dtype. In float16 and bfloat16 the
tolerance is also at least twice the error of the reference itself run in that dtype on the same inputs
(the flash-attention rule): rounding the inputs alone can cost more than the table allows, as in the
bfloat16 post-LN-only FF case, where the reference in bfloat16 is off by 6.5e-2. An input an
implementation declines (``Backend.refusals``) is counted as skipped with its reason, never as passed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .backends import availability, implementation
from .core import attention_of, attribute
from .layer import cap_logits
from .methods import STRUCTURES, form, methods_for
from .peers import peer_implementation
from .reference import reference
from .testing import STRUCTURE_KINDS, random_layer
from .verify import row_errors, tolerance

# (name, random_layer arguments) of the attention features each structure is tried with
FEATURES = (
    ("plain", dict(N=24)),
    ("padding", dict(N=24, pad=5)),
    ("causal+window", dict(N=40, causal=True, window=9, pad=3)),
    ("radius", dict(N=40, radius=6, pad=2)),
    ("softcap", dict(N=24, softcap=1.5, pad=4)),
)
GQA = ("llama", dict(N=33, window=12, pad=2))  # 4 query heads on 2 KV heads, RoPE, causal


@dataclass
class Outcome:
    implementation: str
    primitive: str
    case: str
    dtype: str
    error: Optional[float] = None  # worst row error over the methods, None when skipped
    tolerance: Optional[float] = None
    reference_error: Optional[float] = None  # the reference's own error in this dtype (float16/bfloat16)
    seconds: float = 0.0
    skipped: Optional[str] = None  # the implementation's reasons for declining the input

    @property
    def passed(self) -> bool:
        return self.skipped is None and self.error is not None and self.error <= self.tolerance

    def line(self) -> str:
        what = f"{self.implementation:<8}{self.primitive:<16}{self.case:<24}{self.dtype:<10}"
        if self.skipped is not None:
            return f"{what}skipped: {self.skipped}"
        return f"{what}{'ok  ' if self.passed else 'FAIL'} error {self.error:.1e} (tolerance {self.tolerance:.0e}) {self.seconds:.3f} s"


@dataclass
class Report:
    device: str
    outcomes: list = field(default_factory=list)
    unavailable: dict = field(default_factory=dict)  # implementation -> why it cannot run here

    @property
    def failed(self) -> list:
        return [o for o in self.outcomes if o.skipped is None and not o.passed]

    def table(self) -> str:
        lines = [f"kobattr selftest on {self.device}: every implementation against the float64 reference",
                 f"{'implementation':<15}{'primitive':<16}{'passed':>7}{'failed':>7}{'skipped':>8}  {'worst error':>11}"
                 f"  {'time (s)':>8}"]
        groups: dict = {}
        for o in self.outcomes:
            groups.setdefault((o.implementation, o.primitive), []).append(o)
        for (name, primitive), items in groups.items():
            ran = [o for o in items if o.skipped is None]
            worst = max((o.error for o in ran), default=None)
            lines.append(f"{name:<15}{primitive:<16}{sum(o.passed for o in ran):>7}{sum(not o.passed for o in ran):>7}"
                         f"{len(items) - len(ran):>8}  {'-' if worst is None else f'{worst:.1e}':>11}"
                         f"  {sum(o.seconds for o in items):>8.2f}")
        for name, reason in self.unavailable.items():
            lines.append(f"{name:<15}unavailable: {reason}")
        for o in self.failed:
            lines.append(f"FAILED {o.implementation} {o.primitive} {o.case} {o.dtype}: error {o.error:.2e} > "
                         f"tolerance {o.tolerance:.0e}")
        lines.append("FAIL" if self.failed else "PASS")
        return "\n".join(lines)


def _cases():
    for structure, kind in STRUCTURE_KINDS.items():
        for name, kwargs in FEATURES:
            yield f"{structure}/{name}", kind, kwargs
    yield "pre/gqa", GQA[0], GQA[1]


def _primitives(impl) -> tuple:
    """The primitives of ``impl`` the self-test runs: its own, and "peers" where it brings peer kernels."""
    own = tuple(impl.primitives)
    return own + (("peers",) if "attention_maps" in own and peer_implementation(impl).methods else ())


def _methods(impl, primitive: str, structure: str) -> list:
    """The methods of ``structure`` that ``primitive`` of ``impl`` computes."""
    if primitive == "peers":
        return [m for m in methods_for(structure) if m in peer_implementation(impl).methods]
    methods = [m for m in methods_for(structure) if form(m, structure).primitive == primitive]
    if primitive == "ff_maps":
        methods = [m for m in methods if m in STRUCTURES[structure].scopes]
    return methods


def run(device: Optional[str] = None, dtypes: Optional[tuple] = None, names: Optional[tuple] = None,
        on_outcome: Optional[Callable[[Outcome], None]] = None, primitives: Optional[tuple] = None) -> Report:
    """Run the self-test; ``device`` defaults to cuda where torch sees one, ``dtypes`` to float32 (plus
    float16 and bfloat16 on cuda), ``names`` to every implementation, ``primitives`` to all they run
    (attention_maps, ff_maps, row_stats, peers). ``on_outcome`` sees each outcome as
    soon as it is known (the CLI prints it, so a run cut short still shows what it found)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = dtypes or ((torch.float32, torch.float16, torch.bfloat16) if device == "cuda" else (torch.float32,))
    report = Report(device=device)
    impls = {}
    for name, reason in availability().items():
        if names is not None and name not in names:
            continue
        if reason is not None:
            report.unavailable[name] = reason
        else:
            impls[name] = implementation(name)
    for case, kind, kwargs in _cases():
        exact = random_layer(kind, dtype=torch.float64, device=device, **kwargs)
        structure = exact.structure
        ref = reference(exact, methods="all")
        for dtype in dtypes:
            layer = exact.to(dtype=dtype)
            low = None if dtype in (torch.float32, torch.float64) else reference(layer, methods="all")
            for name, impl in impls.items():
                for primitive in _primitives(impl):
                    if primitives is not None and primitive not in primitives:
                        continue
                    methods = _methods(impl, primitive, structure)
                    outcome = Outcome(name, primitive, case, str(dtype).replace("torch.", ""))
                    report.outcomes.append(outcome)
                    _try(outcome, impl, primitive, layer, methods, ref, dtype, low)
                    if on_outcome is not None:
                        on_outcome(outcome)
    return report


def _try(outcome: Outcome, impl, primitive: str, layer, methods, ref, dtype, low=None, ff_gemm_dtype=None,
         rows=None, contract=None) -> None:
    """Run ``primitive`` of ``impl`` on ``layer`` and fill ``outcome``; ``low`` is the reference computed in the
    layer's own (low) precision, whose error against ``ref`` sets the tolerance's floor, or None; ff_maps with
    its products with W_2 in ``ff_gemm_dtype`` (attribute's ff_gemm; None: the compute dtype), held to that
    dtype's tolerance; ``rows`` and ``contract`` (K, N) as attribute takes them (the tuner's output modes)."""
    attn = attention_of(layer)
    outputs = frozenset(mode for mode, asked in (("rows", rows is not None), ("contract", contract is not None))
                        if asked)
    # the peer kernels come with the implementation dispatch chose for the attention maps, and take what it takes
    chosen = "attention_maps" if primitive == "peers" else primitive
    reasons = impl.refusals(chosen, attn, ff_gemm_dtype, outputs)
    if reasons:
        outcome.skipped = " ".join(reasons)
        return
    low_products = primitive == "ff_maps" and ff_gemm_dtype is not None
    outcome.tolerance = tolerance(ff_gemm_dtype if low_products else dtype)
    if primitive == "row_stats":  # against log sum_j exp(cap(scale q.k)) over the visible keys, written out in float64
        exact = layer.to(dtype=torch.float64)
        group = exact.n_heads // exact.n_kv_heads
        logits = cap_logits(exact.q @ exact.k.repeat_interleave(group, 1).transpose(-1, -2) * exact.softmax_scale,
                            exact.softcap)
        want = torch.logsumexp(logits.masked_fill(~exact.visible()[:, None], float("-inf")), -1)
        start = time.perf_counter()
        got = impl.row_lse(attn)
        outcome.seconds = time.perf_counter() - start
        real = exact.valid[:, None].expand_as(want)
        outcome.error = float((got.double() - want).abs()[real].max())
        return
    if layer.q.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    ff_gemm = str(ff_gemm_dtype).replace("torch.", "") if low_products else "float32"
    # the instance itself, with its settings (the tuner's candidates)
    result = attribute(layer, methods=methods, backend={chosen: impl}, verify=0, ff_gemm=ff_gemm, rows=rows,
                       contract=contract)
    if layer.q.is_cuda:
        torch.cuda.synchronize()
    outcome.seconds = time.perf_counter() - start
    assert result.backends[primitive] == impl.name

    def expected(m):
        want = ref["maps"][m] if rows is None else ref["maps"][m][:, rows]
        if contract is not None:  # contract @ the selected rows of the map
            want = (contract if rows is None else contract[:, rows]).to(want) @ want
        return want

    outcome.error = max(float(row_errors(result.maps[m].to(ref["maps"][m].device), expected(m)).max()) for m in methods)
    if low is not None:
        outcome.reference_error = max(float(row_errors(low["maps"][m], ref["maps"][m]).max()) for m in methods)
        outcome.tolerance = max(outcome.tolerance, 2 * outcome.reference_error)
