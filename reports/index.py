"""Run every report that has inputs, and write index.md linking each table and figure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.core.files import atomic_write
from reports.ablation import report_ablation
from reports.compare import report_compare
from reports.efficiency import report_efficiency
from reports.oracle import report_oracle
from reports.paired import report_paired
from reports.pass1 import report_pass1
from reports.passk import report_passk
from reports.runs import Run, Sweep, find_runs, find_sweeps
from reports.steering import find_steering, report_steering
from reports.traces import report_traces
from reports.training import report_training
from reports.viewer import write_viewer


@dataclass
class Inputs:
    """Everything the report functions read, found once under the given folders."""

    dirs: list[Path]
    runs: list[Run]
    sweeps: list[Sweep]
    steering: list[Path] = field(default_factory=list)  # steer_*.json (`autodeco steer`)
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def scan(cls, dirs: list[str | Path], aliases: dict[str, str] | None = None, on_error=None) -> Inputs:
        """Find every input; `aliases` renames models (e.g. an AutoDeco folder → its base model's
        name, so AutoDeco rows sit in the base model's block as in the paper's tables).
        ``on_error(message)`` skips a damaged results or sweep file instead of failing."""
        dirs = [Path(d) for d in dirs]
        inputs = cls(dirs, [], find_sweeps(dirs, on_error), find_steering(dirs), dict(aliases or {}))
        inputs.add_runs(find_runs(dirs, on_error))
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


# ---------------------------------------------------------------------------------------------
# The registry: one entry per `autodeco report <kind>`, all with the signature (inputs, out, options)


@dataclass(frozen=True)
class ReportKind:
    name: str
    title: str  # the heading in index.md
    help: str  # the line in `autodeco report --help`
    build: Callable[[Inputs, Path, Options], list[Path]]


REPORTS: dict[str, ReportKind] = {}


def report(name: str, title: str, help: str):
    """Register ``fn(inputs, out, options) -> [written paths]`` as report kind ``name``; a kind with
    no inputs raises ValueError (``run_all`` records it as skipped)."""
    def register(fn: Callable[[Inputs, Path, Options], list[Path]]):
        REPORTS[name] = ReportKind(name, title, help, fn)
        return fn

    return register


@report("pass1", "Tables 1-2: Pass@1 by model × method",
        "Tables 1-2: rows model × method, columns tasks + average, mean ± std, best bold")
def _pass1(i: Inputs, o: Path, opt: Options) -> list[Path]:
    return report_pass1(i.eval_runs, i.sweeps, o, opt.tasks, opt.paper, opt.paper_model)


@report("passk", "Tables 5-7: Pass@k and relative error reduction",
        "Tables 5-7: Pass@k for every k present, with AutoDeco's relative error reduction")
def _passk(i: Inputs, o: Path, opt: Options) -> list[Path]:
    return report_passk(i.eval_runs, o, opt.ks, opt.tasks, with_paper=bool(opt.paper))


@report("oracle", "Figure 3: oracle sweep vs AutoDeco",
        "Figure 3: accuracy vs T (P=1) and vs P (best T) per model × task, AutoDeco as a line")
def _oracle(i: Inputs, o: Path, opt: Options) -> list[Path]:
    return report_oracle(i.runs, i.sweeps, o, opt.pair)


@report("paired", "Paired differences vs the baselines (95% CI, p)",
        "every method − default / greedy / recommended / meanshift / static (CV) on shared problems: "
        "Δ with its 95% CI and a paired t-test")
def _paired(i: Inputs, o: Path, opt: Options) -> list[Path]:
    return report_paired(i.eval_runs, i.sweeps, o, opt.tasks)


@report("ablation", "Figure 4: which heads act", "Figure 4: default vs temp head only vs top-p head only vs both")
def _ablation(i: Inputs, o: Path, opt: Options) -> list[Path]:
    return report_ablation(i.eval_runs, o, opt.tasks)


@report("efficiency", "Table 3: cost of the heads",
        "Table 3 + plot from efficiency.json (`autodeco bench efficiency`)")
def _efficiency(i: Inputs, o: Path, opt: Options) -> list[Path]:
    return report_efficiency(i.dirs, o)


@report("traces", "Figure 5: predicted T and P along generations",
        "Figure 5: per-token predicted T and P from the samples files' traces")
def _traces(i: Inputs, o: Path, opt: Options) -> list[Path]:
    return report_traces(i.eval_runs, o, opt.max_lines)


@report("steering", "Table 4 + Figure 5: steering T/P by natural-language commands",
        "Table 4 + Figure 5: T/P under natural-language commands (steer_*.json from `autodeco steer`) "
        "next to the paper's Table 4")
def _steering(i: Inputs, o: Path, opt: Options) -> list[Path]:
    return report_steering(i.steering, o, i.aliases, runs=i.runs)


@report("training", "Figure 6: training curves and candidate checkpoints",
        "Figure 6: loss curves (log_history.jsonl) + evaluated checkpoint candidates")
def _training(i: Inputs, o: Path, opt: Options) -> list[Path]:
    return report_training(i.dirs, i.runs, o)


@report("compare", "Comparison of all runs", "one table and one plot comparing any set of runs")
def _compare(i: Inputs, o: Path, opt: Options) -> list[Path]:
    return report_compare([r for r in i.runs if not r.sweep], o)


@report("viewer", "Results viewer: every sample, token by token",
        "viewer.html: every sample's text and verdict, AutoDeco tokens coloured by T/P, two methods side "
        "by side, Pass@1 with 95% CIs (open in a browser; `autodeco view` has the options)")
def _viewer(i: Inputs, o: Path, opt: Options) -> list[Path]:
    return write_viewer([r for r in i.eval_runs if not r.sweep], Path(o) / "viewer.html", opt.tasks,
                        sources=[str(d) for d in i.dirs])


def run_all(inputs: Inputs, out: Path, options: Options, kinds: list[str] | None = None,
            log: Callable[[str], None] = print) -> dict[str, list[Path] | str]:
    """Every report kind that has inputs; a kind without inputs records why it was skipped."""
    done: dict[str, list[Path] | str] = {}
    for kind in kinds or list(REPORTS):
        try:
            done[kind] = REPORTS[kind].build(inputs, Path(out), options)
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
        lines.append(f"## {REPORTS[kind].title if kind in REPORTS else kind}")
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
            elif path.suffix == ".html":
                lines.append(f"- page [{rel}]({rel}) (self-contained HTML: open it in a browser)")
            elif path.suffix == ".png":
                lines += [f"- figure [{rel.stem}]({rel}) ([PDF]({rel.with_suffix('.pdf')}))", "",
                          f"  ![{rel.stem}]({rel})"]
        lines.append("")
    return atomic_write(out / "index.md", "\n".join(lines))
