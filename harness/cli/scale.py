"""`autodeco gather` and `autodeco launch ray`: one run spread over many processes and machines.

``gather`` merges the shards of ``eval``, ``sweep`` or ``data reject-sample`` runs made with
``--shard I/N`` (harness/gather.py checks them) and replays the command on the merged sample
stores without an engine, so it writes the files one unsharded run writes. ``launch ray`` runs
the N shard commands as Ray tasks (harness/launch.py; a sweep in its two rounds) and then gathers.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from harness.cli.common import log
from harness.core import config as configs
from harness.core.config import FieldError
from harness.core.errors import UserError

GATHER_EPILOG = """\
examples:
  autodeco eval --model smollm2 --tasks arith --seeds 2 --samples 4 --shard 0/2 --out shards   # on machine A
  autodeco eval --model smollm2 --tasks arith --seeds 2 --samples 4 --shard 1/2 --out shards   # on machine B
  autodeco gather --runs shards --out outputs            # outputs/smollm2/results_*.json, samples_*.jsonl
  autodeco gather --runs shard0 shard1 --out outputs     # shards with one --out folder each

Each --runs folder holds shard manifests (shards/*.json) next to the shards' sample stores. Every
shard 0..N-1 must be there once, finished, with the same settings (model, backend, tasks, decoding,
seeds, samples, limit, max tokens, sweep grids); the prompts of every doc must agree. Grading runs
here, once, as in an unsharded run; the gathering machine needs the model's tokenizer and the
benchmark data (--data-dir, else the shards' own setting).
"""

LAUNCH_EPILOG = """\
examples:
  autodeco launch ray --shards 2 -- eval --model smollm2 --tasks arith --seeds 2 --samples 2 --out outputs
  autodeco launch ray --shards 16 --gpus-per-shard 1 --address auto -- eval --model r1-distill-qwen-7b \\
      --tasks aime,hmmt25 --decoding autodeco --seeds 8 --samples 16 --backend vllm --out outputs
  autodeco launch ray --shards 8 --gpus-per-shard 1 -- sweep --config configs/sweeps/paper.yaml --model M

Runs `autodeco <command> --shard I/N` for I = 0..N-1 as Ray tasks (a sweep: twice, the second round
with --best-from), then `autodeco gather --runs OUT --out OUT`: OUT/<model>/ ends up holding the
files of one unsharded run. Without --address a local Ray cluster is started for the run. Shard
logs: OUT/shards/logs/. A failed launch can simply be run again: finished samples are kept.
"""


@dataclass
class GatherConfig:
    runs: list[str] = field(default_factory=list, metadata={
        "help": "the --out folder of every shard (shards may share one); required", "nargs": "+",
        "metavar": "DIR"})
    out: str = field(default="", metadata={"help": "where the merged run goes (<out>/<model_name>/, the layout "
                                                   "of one unsharded run); required"})
    data_dir: str | None = field(default=None, metadata={"help": "benchmark files for grading (default: the "
                                                                 "shards' --data-dir)"})
    wandb: str = field(default="auto", metadata={"help": "W&B logging of the merged run, as for eval",
                                                  "choices": ("auto", "offline", "online", "off")})

    def check(self) -> None:
        if not self.runs:
            raise FieldError("runs", "is required: the --out folder of every shard")
        if not self.out:
            raise FieldError("out", "is required")


@dataclass
class LaunchConfig:
    shards: int = field(default=0, metadata={"help": "number of shards N (one Ray task and one engine each); required"})
    address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join (`ray start --head` prints it; auto = the cluster this node belongs to); "
                "default: a local cluster for this run"})
    cpus_per_shard: float = field(default=1.0, metadata={"help": "CPUs Ray reserves per shard"})
    gpus_per_shard: float = field(default=0.0, metadata={"help": "GPUs Ray reserves per shard (and makes visible "
                                                                 "to it); e.g. the tensor_parallel_size"})
    retries: int = field(default=1, metadata={"help": "Ray retries of a shard whose worker or node died"})
    gather_out: str | None = field(default=None, metadata={"help": "where the merged run goes (default: the "
                                                                   "command's --out)"})

    def check(self) -> None:
        if self.shards < 1:
            raise FieldError("shards", f"must be >= 1, got {self.shards}")
        for name in ("cpus_per_shard", "gpus_per_shard", "retries"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# gather


def cmd_gather(args) -> int:
    gather_runs(configs.from_args(GatherConfig, args))
    return 0


def _stored(backend_name: str, path: str, **engine_options):
    """In place of `get_backend`: the recorded backend's name and options are not needed, no engine is."""
    from harness.backends.stored import StoredBackend

    return StoredBackend(path)


def _stored_in_turn(paths: list[str], backend_name: str, engine_options: dict):
    """In place of `loaded_in_turn`: an engine-free backend per model path (one tokenizer while
    checkpoints share a base)."""
    backend = None
    for path in paths:
        if backend is None or not backend.load_heads(path):
            backend = _stored(backend_name, path)
        yield backend


def gather_runs(cfg: GatherConfig) -> None:
    """Merge every complete job in ``cfg.runs`` into ``cfg.out`` and write its results."""
    from harness.cli.eval import EvalConfig, SweepConfig, run_eval, run_sweep
    from harness.gather import find_jobs, merge_reject_samples, merge_stores

    for job in find_jobs(cfg.runs):
        log(f"gather: {job} from {', '.join(map(str, job.roots))}")
        if job.command == "reject-sample":
            path, totals = merge_reject_samples(job, cfg.out)
            print(f"reject-sample: {totals.get('rows', 0)} rows of {totals.get('problems', 0)} problems from "
                  f"{job.count} shards → {path}")
            continue
        added = merge_stores(job, cfg.out, warn=lambda message: log(f"warning: {message}"))
        log("gather: " + ", ".join(f"{n} samples merged into {Path(cfg.out) / model}" for model, n in added.items()))
        values = {**job.config, "out": cfg.out, "shard": None, "wandb": cfg.wandb, "no_progress": True}
        if cfg.data_dir:
            values["data_dir"] = cfg.data_dir
        source = str(job.shards[0].path)
        if job.command == "eval":
            run_eval(configs.build(EvalConfig, (source, values)), engines=_stored_in_turn)
        elif job.command == "sweep":
            run_sweep(configs.build(SweepConfig, (source, values | {"best_from": []})), engine=_stored)
        else:
            raise UserError(f"{source}: cannot gather command {job.command!r}")


# ---------------------------------------------------------------------------------------------
# launch ray


def _inspect(argv: list[str]) -> tuple[str, Path, str]:
    """The sharded command's name, the folder its shards write to, and its W&B mode."""
    from harness.cli import build_parser
    from harness.cli.eval import EvalConfig, SweepConfig

    if any(a == "--shard" or a.startswith("--shard=") for a in argv):
        raise UserError("launch sets --shard itself (shards 0..N-1); leave it out of the command")
    parsed = build_parser().parse_args(argv)
    if parsed.command in ("eval", "sweep"):
        cfg = configs.from_args(EvalConfig if parsed.command == "eval" else SweepConfig, parsed)
        if getattr(cfg, "best_from", None):
            raise UserError("launch runs both rounds of a sharded sweep itself; leave --best-from out")
        return parsed.command, Path(cfg.out), cfg.wandb
    if parsed.command == "data" and getattr(parsed, "data_command", None) == "reject-sample":
        return "reject-sample", Path(parsed.out).parent, "off"
    raise UserError(f"launch shards eval, sweep or data reject-sample, not {' '.join(argv[:2])!r}")


def cmd_launch(args) -> int:
    from harness.launch import cluster, run_on_ray

    cfg = configs.from_args(LaunchConfig, args)
    argv = list(args._extra)
    if argv[:1] != ["--"] or len(argv) < 2:  # after --, the command's own options (--config, --out) stay its own
        raise UserError("give the command to shard after --, e.g. autodeco launch ray --shards 4 -- eval ...")
    argv = argv[1:]
    command, root, wandb = _inspect(argv)
    n = cfg.shards

    def run_round(extra: list[str], name: str) -> None:
        commands = [[*argv, "--shard", f"{i}/{n}", *extra] for i in range(n)]
        logs = [root / "shards" / "logs" / f"{command}-{name}.shard-{i}-of-{n}.log" for i in range(n)]
        log(f"launch: {n} shards of `autodeco {' '.join(argv)}` ({name}) on Ray")
        run_on_ray(commands, logs, cpus=cfg.cpus_per_shard, gpus=cfg.gpus_per_shard, retries=cfg.retries, log=log)

    with cluster(cfg.address, cfg.cpus_per_shard * n):
        run_round([], "round-1")
        if command == "sweep":  # the top-p grid needs the best temperature of every shard's first round
            run_round(["--best-from", str(root)], "round-2")
    gather_runs(GatherConfig(runs=[str(root)], out=cfg.gather_out or str(root), wandb=wandb))
    return 0


def register(subparsers) -> None:
    """Add `gather` and `launch` to the `autodeco` parser."""
    g = subparsers.add_parser("gather", help="merge the shards of a --shard I/N run into the files of one run",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=GATHER_EPILOG)
    g.add_argument("--config", help="YAML whose keys are the options below; flags given here win")
    configs.add_arguments(g, GatherConfig)
    g.set_defaults(func=cmd_gather)

    launch = subparsers.add_parser("launch", usage="autodeco launch ray [options] -- COMMAND ...",
                                   help="run the N shards of eval/sweep/reject-sample as Ray tasks, then gather",
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LAUNCH_EPILOG)
    launch.add_argument("engine", choices=("ray",), help="the distributed engine that runs the shards")
    launch.add_argument("--config", help="YAML whose keys are the options below; flags given here win")
    configs.add_arguments(launch, LaunchConfig)
    launch.set_defaults(func=cmd_launch, _takes_extra=True)  # the command to shard: after --
