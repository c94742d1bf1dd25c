"""What the install built: the C++ extensions kobattr._cpu and kobattr._cuda (for `kobattr info`).

csrc/build_extensions.py writes kobattr/_build_info.json at build time; this module adds whether each
extension imports now.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

BUILD_INFO = Path(__file__).resolve().parent / "_build_info.json"
EXTENSIONS = ("_cpu", "_cuda")


def extension_report() -> dict:
    """{"_cpu": {...}, "_cuda": {...}}: per extension built (bool), archs (CUDA SM versions; for _cpu the
    instruction-set builds this processor runs, widest first, the first being the one used), reason (why
    not built, or a caveat; None if none), importable (bool) and import_error (str or None)."""
    try:
        recorded = json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError) as error:
        recorded = {name: {"reason": f"no build record ({error}): kobattr was installed without building csrc/"}
                    for name in EXTENSIONS}
    report = {}
    for name in EXTENSIONS:
        entry = {"built": False, "archs": [], "reason": "the build did not record this extension"}
        entry.update(recorded.get(name, {}))
        try:
            module = importlib.import_module(f"kobattr.{name}")
            entry["importable"], entry["import_error"] = True, None
            if hasattr(module, "isas"):  # the CPU kernel's instruction-set builds this processor runs, widest first
                entry["archs"] = module.isas()
        except ImportError as error:
            entry["importable"], entry["import_error"] = False, str(error)
        report[name] = entry
    return report
