"""Table 4 and Figure 5: steering T and P by natural-language commands (`autodeco steer` files).

Reads `steer_*.json` (schema in harness/steer.py and DESIGN.md) and writes:
- `steering` — Table 4's layout (avg T / avg P per command, Δ vs baseline, consistency), the
  paper's published rows first, then ours, one block per file: heads without steering training
  first, then heads trained by `autodeco train-steer` (a file's ``config.targeted_training``), each
  row saying which it is; the notes say how many of a file's prompts and wordings that training saw;
- `steering_accuracy` — when results files of a steering-trained model and of the model it started
  from (``targeted_training.init_from``) share a task under the `autodeco` preset: both Pass@1 with
  their 95% intervals and the paired difference (harness.stats), i.e. what steering training cost
  in accuracy without a command;
- `steering_prompts` — per prompt: baseline T and P and each command's ΔT, ΔP (the data behind
  the deltas figure);
- `steering_traces` — Figure 5: for up to three prompts, T and P along the generation under the
  baseline (solid), `higher` commands (dotted) and `lower` commands (dashed);
- `steering_deltas` — per-prompt ΔT and ΔP of each command, with the consistency in the legend.
Several files get one traces/deltas figure each (suffixed with the model name).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from harness.stats import paired_difference, pass1_estimate, proportion_estimate
from reports.paper import load_paper
from reports.render import Interval, Table, new_figure, save_figure, write_table
from reports.runs import ReportInputError, Run, find_files

STEER_GLOB = "steer_*.json"
# our command name -> the paper's Table 4 keys (value, consistency) and its column header
PAPER_COMMANDS = {"low": ("low_diversity", "low_consistency", "Low diversity"),
                  "high": ("high_diversity", "high_consistency", "High diversity")}
QUANTITIES = (("temperature", "avg temperature", "avg T"), ("top_p", "avg top-p", "avg P"))
LINE_STYLE = {None: "-", "higher": ":", "lower": "--"}
REQUIRED = ("config", "prompts", "samples", "per_prompt", "summary")
REQUIRED_CONFIG = ("model_name", "baseline", "commands", "seeds", "max_tokens", "n_prompts")


def find_steering(dirs: list[str | Path]) -> list[Path]:
    """steer_*.json files under the folders (or given directly)."""
    return sorted(set(find_files(dirs, STEER_GLOB)))


def load_steering(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ReportInputError(f"{path}: cannot read steering file ({err})") from None
    if not isinstance(data, dict) or data.get("kind") != "steering":
        raise ReportInputError(f"{path}: not a steering file (field 'kind' must be 'steering')")
    for key in REQUIRED:
        if key not in data:
            raise ReportInputError(f"{path}: missing field '{key}'")
    for key in REQUIRED_CONFIG:
        if key not in data["config"]:
            raise ReportInputError(f"{path}: missing field 'config.{key}'")
    for command in data["config"]["commands"]:
        if command["name"] not in data["summary"]:
            raise ReportInputError(f"{path}: missing field 'summary.{command['name']}'")
    return data


def _commands(files: list[dict]) -> list[str]:
    """Non-baseline command names across files, in config order."""
    names: list[str] = []
    for data in files:
        for c in data["config"]["commands"]:
            if c["name"] != data["config"]["baseline"] and c["name"] not in names:
                names.append(c["name"])
    return names


def _header(command: str) -> str:
    return PAPER_COMMANDS[command][2] if command in PAPER_COMMANDS else command


def _trained(data: dict) -> dict | None:
    """The file's steering-training provenance (None: heads never trained to follow commands)."""
    return data["config"].get("targeted_training")


def _resolved(path: str | None) -> str | None:
    return None if not path else str(Path(path).expanduser().resolve())


def _stage(data: dict, files: list[dict]) -> str:
    """after steering training / before steering training / no steering training."""
    if _trained(data):
        return "after steering training"
    starts = {_resolved(_trained(d).get("init_from")) for d in files if _trained(d)}
    return "before steering training" if _resolved(data["config"].get("model_path")) in starts else \
        "no steering training"


def _wordings(data: dict) -> set[str]:
    """Every command wording a file's samples were run under (older files without per-sample
    wordings: every wording of its commands; a command's text is a string or a list)."""
    used = {s.get("text") for s in data.get("samples") or [] if s.get("text")}
    if used:
        return used
    found = set()
    for command in data["config"]["commands"]:
        text = command.get("text")
        found.update([text] if isinstance(text, str) else text or [])
    return found


def _training_note(data: dict, label: str) -> str:
    """Where a file's heads came from; for steering-trained heads, what of this file they saw."""
    c = data["config"]
    note = f"{label}: heads from {c.get('model_path', '?')}, backend {c.get('backend', '?')}"
    trained = _trained(data)
    if not trained:
        return note + "; never trained to follow commands."
    info = trained.get("data") or {}
    seen_prompts = len(set(data["prompts"]) & set(trained.get("prompts") or []))
    used = _wordings(data)
    seen_words = len(used & (set(trained.get("lower_wordings") or []) | set(trained.get("higher_wordings") or [])))
    return (note + f"; steering-trained (`autodeco train-steer`, ranking loss) from {trained.get('init_from', '?')} "
            f"on {info.get('n_triples', '?')} triples of {info.get('n_prompts', '?')} prompts with "
            f"{info.get('n_lower_wordings', '?')} + {info.get('n_higher_wordings', '?')} command wordings. Seen in "
            f"that training: {seen_prompts} of this file's {len(data['prompts'])} prompts, {seen_words} of its "
            f"{len(used)} wordings.")


def table4(files: list[dict], labels: list[str], name: str = "steering") -> Table:
    commands = _commands(files)
    columns = ["Source", "Quantity", "Baseline"]
    for c in commands:
        columns += [_header(c), f"Δ {c}", f"consistency {c}"]
    rows, midrules = [], set()
    paper = load_paper()["table4"]
    for prow in paper["rows"]:
        row = ["Paper (after targeted training, N=100)", prow["quantity"], f"{prow['baseline']:.2f}"]
        for c in commands:
            value, consistency, _ = PAPER_COMMANDS.get(c, ("", "", ""))
            if value in prow:  # published cells keep the paper's two decimals
                row += [f"{prow[value]:.2f}", f"{prow[value] - prow['baseline']:+.2f}", f"{prow[consistency]:.2f}"]
            else:
                row += [None, None, None]
        rows.append(row)
    for data, label in zip(files, labels, strict=True):
        midrules.add(len(rows))
        summary, base = data["summary"], data["config"]["baseline"]
        for field, quantity, _ in QUANTITIES:
            row = [label, quantity, summary[base][f"{field}_mean"]]
            for c in commands:
                s = summary.get(c)
                row += ([s[f"{field}_mean"], s[f"delta_{field}"], s[f"consistency_{field}"]] if s
                        else [None, None, None])
            rows.append(row)
    source = paper["rows"][0]["source"]
    notes = [
        f"Paper: {load_paper()['paper']}, Table 4 ({paper['title'].split(': ', 1)[-1]}); source {source}; "
        "its Δ is computed here from the published averages. The paper's heads were trained for this "
        "(targeted training with a ranking loss on command-bearing prompts).",
        "Ours: measured by `autodeco steer` with the heads exactly as the named model folder has them: "
        "'no/before steering training' = heads trained only by `autodeco train` (nothing taught them the "
        "commands); 'after steering training' = the same heads continued by `autodeco train-steer` (our "
        "ranking-loss targeted training). N = prompts × seeds; avg = mean over prompts of the per-sample mean "
        "over generated tokens; Δ = command − baseline; consistency = fraction of prompts whose mean T (P) "
        "moved in the command's direction vs the same prompt's baseline (low → lower, high → higher). "
        "A command with several wordings gives prompt i wording i mod k.",
    ] + [_training_note(data, label) for data, label in zip(files, labels, strict=True)]
    return Table(name=name, title="Table 4 (ours): steering T and P by natural-language commands",
                 columns=columns, rows=rows, notes=notes, precision=3, midrules=midrules)


def prompts_table(files: list[dict], labels: list[str], name: str = "steering_prompts") -> Table:
    commands = _commands(files)
    columns = ["Model", "#", "Prompt", "baseline T"] + [f"ΔT {c}" for c in commands]
    columns += ["baseline P"] + [f"ΔP {c}" for c in commands]
    rows = []
    for data, label in zip(files, labels, strict=True):
        by = {(r["prompt_index"], r["command"]): r for r in data["per_prompt"]}
        base = data["config"]["baseline"]
        for i, prompt in enumerate(data["prompts"]):
            if (i, base) not in by:
                continue
            short = prompt if len(prompt) <= 48 else prompt[:47] + "…"
            row = [label, i, short, by[(i, base)]["temperature_mean"]]
            row += [by[(i, c)]["delta_temperature"] if (i, c) in by else None for c in commands]
            row += [by[(i, base)]["top_p_mean"]]
            row += [by[(i, c)]["delta_top_p"] if (i, c) in by else None for c in commands]
            rows.append(row)
    return Table(name=name, title="Steering per prompt: baseline T/P and each command's Δ", columns=columns,
                 rows=rows, precision=3)


def traces_figure(data: dict, label: str, out: Path, name: str, max_prompts: int = 3) -> list[Path]:
    """Figure 5: T and P along the first seed's generation of up to ``max_prompts`` prompts."""
    commands = data["config"]["commands"]
    seed = data["config"]["seeds"][0]
    by = {(s["prompt_index"], s["command"]): s for s in data["samples"] if s["seed"] == seed}
    prompts = sorted({i for i, _ in by})[:max_prompts]
    fig, axes = new_figure(2 * len(prompts), ncols=2, size=(5.0, 2.4))
    for row, i in enumerate(prompts):
        ax_t, ax_p = axes[2 * row], axes[2 * row + 1]
        for k, command in enumerate(commands):
            sample = by.get((i, command["name"]))
            if sample is None:
                continue
            stride = max(1, -(-sample["n_tokens"] // max(1, len(sample["trace"]["T"]))))
            style = dict(ls=LINE_STYLE.get(command["direction"], "-."), lw=1.2, color=f"C{k}",
                         label=command["name"])
            ax_t.plot([stride * x for x in range(len(sample["trace"]["T"]))], sample["trace"]["T"], **style)
            ax_p.plot([stride * x for x in range(len(sample["trace"]["P"]))], sample["trace"]["P"], **style)
        prompt = data["prompts"][i]
        ax_t.set_title(f"#{i}: {prompt[:38]}…" if len(prompt) > 38 else f"#{i}: {prompt}", fontsize=8)
        ax_t.set_ylabel("predicted T")
        ax_p.set_ylabel("predicted P")
        ax_t.legend(fontsize=6)
    for ax in axes[-2:]:
        ax.set_xlabel("generated token")
    fig.suptitle(f"{label}: T and P along the generation (seed {seed})", fontsize=9)
    return save_figure(fig, out, name)


def deltas_figure(data: dict, label: str, out: Path, name: str) -> list[Path]:
    """Per-prompt ΔT and ΔP of every command vs the same prompt's baseline."""
    base = data["config"]["baseline"]
    commands = [c for c in data["config"]["commands"] if c["name"] != base]
    fig, axes = new_figure(2, ncols=2, size=(5.0, 3.0))
    for ax, (field, _, short) in zip(axes, QUANTITIES, strict=True):
        for k, command in enumerate(commands, start=1):
            rows = sorted((r for r in data["per_prompt"] if r["command"] == command["name"]),
                          key=lambda r: r["prompt_index"])
            consistency = data["summary"][command["name"]][f"consistency_{field}"]
            ax.plot([r["prompt_index"] for r in rows], [r[f"delta_{field}"] for r in rows], "o", ms=4,
                    color=f"C{k}", label=f"{command['name']} ({command['direction']}; consistency {consistency:.2f})")
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_xlabel("prompt #")
        ax.set_ylabel(f"Δ {short.split()[-1]} vs baseline")
        ax.legend(fontsize=6)
    fig.suptitle(f"{label}: per-prompt change of the mean predicted T and P", fontsize=9)
    return save_figure(fig, out, name)


def _labels(files: list[dict], aliases: dict[str, str] | None) -> list[str]:
    texts = []
    for data in files:
        c = data["config"]
        model = (aliases or {}).get(c["model_name"], c["model_name"])
        texts.append(f"Ours: {model}, {_stage(data, files)} (measured, N={c['n_prompts']}×{len(c['seeds'])} seeds, "
                     f"{c['max_tokens']} tok)")
    return [text if texts.count(text) == 1 else f"{text} [{data['config'].get('backend', '?')}, #{k}]"
            for k, (text, data) in enumerate(zip(texts, files, strict=True))]


def accuracy_table(files: list[dict], runs: list[Run], name: str = "steering_accuracy") -> Table | None:
    """Pass@1 without a command of each steering-trained model beside the model it started from, on
    every task both were evaluated on with the `autodeco` preset (newest results file per model and
    task; samples files needed), with the paired difference. None when no such pair exists."""
    by_path: dict[tuple[str, str], Run] = {}
    for run in sorted(runs, key=lambda r: r.raw.get("date") or 0):
        path = _resolved(run.raw.get("config", {}).get("model_path"))
        if path and not run.sweep and run.decoding == "autodeco":
            for task, result in run.tasks.items():
                if result.samples_path is not None:
                    by_path[(path, task)] = run
    rows, pairs = [], {}
    for data in files:
        trained = _trained(data)
        if trained:
            pairs[_resolved(data["config"].get("model_path"))] = _resolved(trained.get("init_from"))
    for after_path, before_path in pairs.items():
        tasks = sorted({t for p, t in by_path if p == after_path} & {t for p, t in by_path if p == before_path})
        for task in tasks:
            before, after = by_path[(before_path, task)], by_path[(after_path, task)]
            a, b = after.tasks[task].verdicts_by_doc(), before.tasks[task].verdicts_by_doc()
            est_b, est_a, diff = pass1_estimate(b), pass1_estimate(a), paired_difference(a, b)
            within = est_b.ci_low <= est_a.mean <= est_b.ci_high if est_b.ci_low == est_b.ci_low else None
            samples = max(len(v) for v in a.values())
            rows.append([task, before.model_name, _cell(est_b), after.model_name, _cell(est_a), _cell(diff),
                         "–" if diff.p_value is None else f"{diff.p_value:.3f}", diff.n, samples,
                         None if within is None else ("yes" if within else "no")])
    if not rows:
        return None
    return Table(name=name, title="Accuracy without a command: before vs after steering training (Pass@1 %)",
                 columns=["Task", "Before", "Pass@1 before [95% CI]", "After (steering-trained)",
                          "Pass@1 after [95% CI]", "Δ after − before [95% CI]", "p", "problems",
                          "samples/problem", "after within before's CI"], rows=rows, precision=1,
                 notes=["Both with the `autodeco` preset and no command (the task's own prompt). Pass@1 = mean over "
                        "problems of each problem's accuracy over its seeds and samples, 95% t interval over "
                        "problems (harness.stats.pass1_estimate); Δ = paired difference over the shared problems "
                        "with a two-sided paired t-test (harness.stats.paired_difference). † = fewer than 10 "
                        "problems."])


def consistency_text(share: float, n: int) -> str:
    """'88% [69, 96] of 24': the share of prompts that moved as commanded, its Wilson 95% interval."""
    est = proportion_estimate(round(share * n), n)
    return f"{100 * est.mean:.0f}% [{100 * est.ci_low:.0f}, {100 * est.ci_high:.0f}] of {n}"


BAR_CONSISTENCY, BAR_DELTA = 0.9, 0.05  # the steering issue's bar, for the temperature


def bar_line(data: dict) -> str:
    """Whether steering-trained heads meet the bar on this file's prompts: every directed command
    moves the mean T as commanded for >= 90% of prompts, by >= 0.05 on average."""
    c, summary = data["config"], data["summary"]
    misses = []
    for command in c["commands"]:
        s = summary[command["name"]]
        if command["name"] == c["baseline"]:
            continue
        sign = -1 if command.get("direction") == "lower" else 1
        if s["consistency_temperature"] < BAR_CONSISTENCY:
            misses.append(f"{command['name']} consistency {100 * s['consistency_temperature']:.0f}% < 90%")
        if sign * s["delta_temperature"] < BAR_DELTA:
            misses.append(f"{command['name']} ΔT {s['delta_temperature']:+.3f} short of {sign * BAR_DELTA:+.2f}")
    verdict = "met" if not misses else "NOT met (" + "; ".join(misses) + ")"
    return (f"{c['model_name']}: bar (T moved as commanded for >= 90% of prompts, |ΔT| >= 0.05, every "
            f"command) {verdict}")


def summary_lines(files: list[Path], runs: list[Run] | None = None) -> list[str]:
    """Printable lines (the demo's headline): per file, each command's ΔT / ΔP and consistency,
    then the accuracy pairs of `accuracy_table`."""
    datas = sorted((load_steering(p) for p in files), key=lambda d: (bool(_trained(d)), d.get("date") or 0))
    lines = []
    for data in datas:
        c, summary = data["config"], data["summary"]
        parts = []
        for command in c["commands"]:
            s = summary[command["name"]]
            if command["name"] != c["baseline"]:
                parts.append(f"{command['name']} ΔT {s['delta_temperature']:+.3f} "
                             f"({consistency_text(s['consistency_temperature'], c['n_prompts'])}), "
                             f"ΔP {s['delta_top_p']:+.3f} ({consistency_text(s['consistency_top_p'], c['n_prompts'])})")
        lines.append(f"{c['model_name']} ({_stage(data, datas)}; {c['n_prompts']} prompts, baseline T "
                     f"{summary[c['baseline']]['temperature_mean']:.3f}): " + "; ".join(parts))
    lines += [bar_line(d) for d in datas if _trained(d)]
    table = accuracy_table(datas, runs or [])
    for row in table.rows if table else []:
        before, after, diff = row[2], row[4], row[5]
        ci = "" if diff.low is None else f" [{diff.low:+.1f}, {diff.high:+.1f}]"
        lines.append(f"accuracy without a command ({row[0]}): {row[3]} {after.mean:.1f}% vs {row[1]} {before.mean:.1f}%,"
                     f" Δ {diff.mean:+.1f} pp{ci}, p = {row[6]}, n = {row[7]} problems × {row[8]} samples")
    return lines


def _cell(estimate) -> Interval:
    has_ci = estimate.ci_low == estimate.ci_low  # NaN with one problem
    return Interval(100 * estimate.mean, None, 100 * estimate.ci_low if has_ci else None,
                    100 * estimate.ci_high if has_ci else None, estimate.n)


def report_steering(files: list[Path], out: Path, aliases: dict[str, str] | None = None,
                    name: str = "steering", runs: list[Run] | None = None) -> list[Path]:
    """Every table and figure of the module docstring; ``runs`` (results files) feed the accuracy table."""
    if not files:
        raise ValueError("no steer_*.json in the given folders (run `autodeco steer --model AUTODECO_MODEL`)")
    datas = sorted((load_steering(p) for p in files), key=lambda d: (bool(_trained(d)), d.get("date") or 0))
    labels = _labels(datas, aliases)
    paths = write_table(table4(datas, labels, name), out)
    paths += write_table(prompts_table(datas, labels, f"{name}_prompts"), out)
    accuracy = accuracy_table(datas, runs or [], f"{name}_accuracy")
    if accuracy is not None:
        paths += write_table(accuracy, out)
    for k, (data, label) in enumerate(zip(datas, labels, strict=True)):
        suffix = "" if len(datas) == 1 else "_" + re.sub(r"[^A-Za-z0-9_.-]+", "-", data["config"]["model_name"]) + f"_{k}"
        paths += traces_figure(data, label, out, f"{name}_traces{suffix}")
        paths += deltas_figure(data, label, out, f"{name}_deltas{suffix}")
    return paths
