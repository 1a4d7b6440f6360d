"""Every `autodeco bench <name>` measurement, one module each; each prints ratios, not raw timings.

decode (AutoDeco vs default sampling per step), engine (overhead: harness / raw generate;
backends: tokens/s per backend), efficiency (the paper's Table 3: FLOPs, latency, memory vs
prompt length), loss and train (the training loss and a training step vs a base forward), grading
(grader throughput). The command-line options live in `harness.cli.bench`.
"""

from __future__ import annotations

from pathlib import Path

from harness.core.files import atomic_write_json


def write_result(out: str | None, name: str, result: dict) -> Path | None:
    """``<out>/<name>`` as JSON (atomic), when an output folder was given."""
    if not out:
        return None
    path = atomic_write_json(Path(out) / name, result)
    print(f"wrote {path}")
    return path
