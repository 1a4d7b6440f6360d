"""Run every report that has inputs, and write index.md linking each table and figure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reports.ablation import report_ablation
from reports.compare import report_compare
from reports.efficiency import report_efficiency
from reports.oracle import report_oracle
from reports.pass1 import report_pass1
from reports.passk import report_passk
from reports.runs import Run, Sweep, find_runs, find_sweeps
from reports.steering import find_steering, report_steering
from reports.traces import report_traces
from reports.training import report_training


@dataclass
class Inputs:
    """Everything the report functions read, found once under the given folders."""

    dirs: list[Path]
    runs: list[Run]
    sweeps: list[Sweep]
    steering: list[Path] = field(default_factory=list)  # steer_*.json (`autodeco steer`)
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def scan(cls, dirs: list[str | Path], aliases: dict[str, str] | None = None) -> Inputs:
        """Find every input; `aliases` renames models (e.g. an AutoDeco folder → its base model's
        name, so AutoDeco rows sit in the base model's block as in the paper's tables)."""
        dirs = [Path(d) for d in dirs]
        inputs = cls(dirs, [], find_sweeps(dirs), find_steering(dirs), dict(aliases or {}))
        inputs.add_runs(find_runs(dirs))
        for sweep in inputs.sweeps:
            sweep.model_name = inputs.aliases.get(sweep.model_name, sweep.model_name)
        return inputs

    def add_runs(self, runs: list[Run]) -> None:
        """Append runs from any source (results files, W&B), renamed by the aliases."""
        for run in runs:
            run.model_name = self.aliases.get(run.model_name, run.model_name)
        self.runs.extend(runs)

    @property
    def eval_runs(self) -> list[Run]:
        """Runs that are not training candidates (those go to the `training` report)."""
        from reports.training import candidate_name

        return [r for r in self.runs if not candidate_name(r)]


@dataclass
class Options:
    tasks: list[str] | None = None
    paper: str | None = None
    paper_model: dict[str, str] | None = None
    pair: dict[str, str] | None = None
    ks: list[int] | None = None
    max_lines: int = 6


# name -> (title, function(inputs, out, options) -> paths)
REPORTS: dict[str, tuple[str, Callable[[Inputs, Path, Options], list[Path]]]] = {
    "pass1": ("Tables 1-2: Pass@1 by model × method",
              lambda i, o, opt: report_pass1(i.eval_runs, i.sweeps, o, opt.tasks, opt.paper, opt.paper_model)),
    "passk": ("Tables 5-7: Pass@k and relative error reduction",
              lambda i, o, opt: report_passk(i.eval_runs, o, opt.ks, opt.tasks, with_paper=bool(opt.paper))),
    "oracle": ("Figure 3: oracle sweep vs AutoDeco",
               lambda i, o, opt: report_oracle(i.runs, i.sweeps, o, opt.pair)),
    "ablation": ("Figure 4: which heads act",
                 lambda i, o, opt: report_ablation(i.eval_runs, o, opt.tasks)),
    "efficiency": ("Table 3: cost of the heads",
                   lambda i, o, opt: report_efficiency(i.dirs, o)),
    "traces": ("Figure 5: predicted T and P along generations",
               lambda i, o, opt: report_traces(i.eval_runs, o, opt.max_lines)),
    "steering": ("Table 4 + Figure 5: steering T/P by natural-language commands",
                 lambda i, o, opt: report_steering(i.steering, o, i.aliases)),
    "training": ("Figure 6: training curves and candidate checkpoints",
                 lambda i, o, opt: report_training(i.dirs, i.runs, o)),
    "compare": ("Comparison of all runs",
                lambda i, o, opt: report_compare([r for r in i.runs if not r.sweep], o)),
}


def run_all(inputs: Inputs, out: Path, options: Options, kinds: list[str] | None = None,
            log: Callable[[str], None] = print) -> dict[str, list[Path] | str]:
    """Every report kind that has inputs; a kind without inputs records why it was skipped."""
    done: dict[str, list[Path] | str] = {}
    for kind in kinds or list(REPORTS):
        try:
            done[kind] = REPORTS[kind][1](inputs, Path(out), options)
            log(f"  report {kind}: {len(done[kind])} files")
        except ValueError as err:
            done[kind] = f"skipped: {err}"
            log(f"  report {kind}: skipped ({err})")
    return done


def write_index(out: Path, done: dict[str, list[Path] | str], header: str = "") -> Path:
    """index.md: per report its title, links to tables (.md/.tex/.csv) and embedded figures."""
    out = Path(out)
    lines = ["# AutoDeco reports", ""] + ([header, ""] if header else [])
    for kind, result in done.items():
        lines.append(f"## {REPORTS[kind][0] if kind in REPORTS else kind}")
        lines.append("")
        if isinstance(result, str):
            lines += [f"_{result}_", ""]
            continue
        for path in result:
            rel = Path(path).resolve().relative_to(out.resolve()) if Path(path).resolve().is_relative_to(
                out.resolve()) else Path(path)
            if path.suffix == ".md":
                stem = rel.with_suffix("")
                lines.append(f"- table [{stem}]({rel}) ([LaTeX]({stem}.tex), [CSV]({stem}.csv))")
            elif path.suffix == ".png":
                lines += [f"- figure [{rel.stem}]({rel}) ([PDF]({rel.with_suffix('.pdf')}))", "",
                          f"  ![{rel.stem}]({rel})"]
        lines.append("")
    path = out / "index.md"
    path.write_text("\n".join(lines))
    return path
