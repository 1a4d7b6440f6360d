"""Steering T and P by natural-language commands: the measurement behind the paper's Table 4.

Every prompt of a config is sent under every command (the command's text appended to the user
message after one space; the baseline command adds nothing), with the `autodeco` preset, so the
heads both predict and apply T_t and P_t. A command may carry several wordings (``text`` a list):
prompt i then gets wording i mod k, so one file measures a whole set of phrasings per direction
(configs/steer/heldout.yaml: wordings and prompts that steering training never saw). We keep each generated token's predicted T and P and
report, per command, the paper's Table 4 quantities:

- avg T / avg P: mean over prompts of the prompt's mean over seeds of the per-sample mean (over
  generated tokens) of T / P;
- ΔT / ΔP: avg(command) − avg(baseline);
- consistency T / P: the fraction (0-1, as the paper prints it) of prompts whose mean T / P under
  the command moved in the command's direction (`lower` / `higher`) compared with the same
  prompt's baseline (a tie does not count as moved).

The same (seed, prompt) draws from the same RNG stream under every command (the request key is
the prompt's, not the command's), so differences come from the command, not the dice.

Output: `<out>/<model_name>/steer_<timestamp>.json`, written atomically:

    {"kind": "steering",
     "config": {"model": str, "model_path": str, "model_name": str, "backend": str,
                "decoding": "autodeco", "seeds": [int], "max_tokens": int, "n_prompts": int,
                "config_file": str | null, "baseline": str,
                "commands": [{"name": str, "text": str | [str] | null, "direction": "lower"|"higher"|null}],
                "targeted_training": {...} | null},              # the heads' steering_training.json
     "prompts": [str],                                  # prompt_index = position in this list
     "samples": [{"prompt_index": int, "command": str, "text": str | null, "seed": int, "n_tokens": int,
                  "finish_reason": str, "response": str, "temperature_mean": float,
                  "top_p_mean": float, "trace": {"T": [float], "P": [float]}}],   # compact trace
     "per_prompt": [{"prompt_index": int, "command": str, "temperature_mean": float,
                     "top_p_mean": float, "delta_temperature": float | null, "delta_top_p": float | null}],
     "summary": {"<command>": {"direction": str | null, "n_prompts": int, "n_samples": int,
                               "temperature_mean": float, "top_p_mean": float,
                               "delta_temperature": float | null, "delta_top_p": float | null,
                               "consistency_temperature": float | null, "consistency_top_p": float | null}},
     "generation": {"samples": int, "tokens": int, "seconds": float},
     "git_hash": str | null, "date": float}

Samples are ordered by command (config order), then prompt, then seed; the baseline's deltas and
consistencies are null. A sample's ``text`` is the wording it got (null for the baseline).
``targeted_training`` is what steering training wrote next to the heads (`STEER_PROVENANCE`:
``init_from``, the wordings and prompts it trained on, ...), null for heads never trained to
follow commands.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.backends import Backend, Request
from harness.core.config import load_yaml
from harness.core.errors import UserError
from harness.core.files import atomic_write, timestamp
from harness.core.paths import CONFIGS_DIR
from harness.decoding import get_preset
from harness.runner import compact, git_hash

DEFAULT_CONFIG = CONFIGS_DIR / "steer" / "default.yaml"
DEFAULT_SEEDS = 1
DEFAULT_MAX_TOKENS = 128
DIRECTIONS = {"lower": -1, "higher": 1}
STEER_PROVENANCE = "steering_training.json"  # written next to heads trained by `autodeco train-steer`


class SteerError(UserError, ValueError):
    """A bad steering config or a model that cannot be steered (the message names the file/key)."""


@dataclass(frozen=True)
class Command:
    name: str
    text: str | tuple[str, ...] | None  # None: the baseline (no command); a tuple: several wordings
    direction: str | None = None  # "lower" | "higher"; None for the baseline

    @property
    def wordings(self) -> tuple[str, ...]:
        """Every wording of the command (none for the baseline)."""
        return () if self.text is None else (self.text,) if isinstance(self.text, str) else self.text

    def wording(self, prompt_index: int) -> str | None:
        """The wording prompt ``prompt_index`` gets: wording i mod k (None for the baseline)."""
        return self.wordings[prompt_index % len(self.wordings)] if self.wordings else None


@dataclass
class SteerConfig:
    prompts: list[str]
    commands: list[Command]
    seeds: int = DEFAULT_SEEDS
    max_tokens: int = DEFAULT_MAX_TOKENS
    path: str | None = None


# ---------------------------------------------------------------------------------------------
# The config file

def load_config(path: str | Path) -> SteerConfig:
    """Read and check a steering YAML (keys documented in configs/steer/default.yaml)."""
    return parse_config(load_yaml(path), Path(path))


def parse_config(data: dict, path: Path) -> SteerConfig:
    """Check a steering mapping (``prompts``, ``commands``, optional ``seeds``, ``max_tokens``)."""
    unknown = sorted(set(data) - {"prompts", "commands", "seeds", "max_tokens"})
    if unknown:
        raise SteerError(f"{path}: unknown key(s) {', '.join(unknown)}")
    prompts = data.get("prompts")
    if not prompts or not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise SteerError(f"{path}: key 'prompts' must be a non-empty list of prompt strings")
    commands = _commands(path, data.get("commands"))
    config = SteerConfig(prompts=prompts, commands=commands, path=str(path))
    for key in ("seeds", "max_tokens"):
        if key in data:
            value = data[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SteerError(f"{path}: key '{key}' must be an integer >= 1, got {value!r}")
            setattr(config, key, value)
    return config


def _commands(path: Path, raw) -> list[Command]:
    if not isinstance(raw, dict) or not raw:
        raise SteerError(f"{path}: key 'commands' must be a mapping name -> {{text, direction}}")
    commands = []
    for name, spec in raw.items():
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"text", "direction"}:
            raise SteerError(f"{path}: commands.{name} must be a mapping with keys text, direction")
        text, direction = spec.get("text"), spec.get("direction")
        if isinstance(text, list):
            if not text or not all(isinstance(t, str) and t.strip() for t in text) or len(set(text)) != len(text):
                raise SteerError(f"{path}: commands.{name}.text as a list must hold distinct non-empty strings")
            text = tuple(text)
        elif text is not None and (not isinstance(text, str) or not text.strip()):
            raise SteerError(f"{path}: commands.{name}.text must be a non-empty string, a list of them, or null")
        if text is None and direction is not None:
            raise SteerError(f"{path}: commands.{name} has no text (the baseline) but a direction")
        if text is not None and direction not in DIRECTIONS:
            raise SteerError(f"{path}: commands.{name}.direction must be one of {', '.join(DIRECTIONS)}, "
                             f"got {direction!r}")
        commands.append(Command(str(name), text, direction))
    baselines = [c.name for c in commands if c.text is None]
    if len(baselines) != 1:
        raise SteerError(f"{path}: key 'commands' needs exactly one command with text null (the baseline), "
                         f"found {len(baselines)}")
    return commands


def baseline_of(commands: list[Command]) -> Command:
    return next(c for c in commands if c.text is None)


def user_message(prompt: str, command: Command, prompt_index: int = 0) -> str:
    """The user turn: the prompt, then the command's wording for this prompt after one space (none
    for the baseline)."""
    text = command.wording(prompt_index)
    return prompt if text is None else f"{prompt} {text}"


# ---------------------------------------------------------------------------------------------
# Measuring

def measure_steering(backend: Backend, prompts: list[str], commands: list[Command], seeds: list[int],
                     max_tokens: int, *, progress: bool = True,
                     log: Callable[[str], None] = print) -> dict:
    """Generate every (prompt, command, seed) with the `autodeco` preset; return the file's
    ``prompts``, ``samples``, ``per_prompt``, ``summary`` and ``generation`` blocks."""
    from tqdm import tqdm

    preset = get_preset("autodeco")
    backend.check_preset(preset)  # BackendError on a plain model
    samples, tokens, start = [], 0, time.perf_counter()
    with tqdm(total=len(prompts) * len(commands) * len(seeds), unit="sample", disable=not progress,
              dynamic_ncols=True) as bar:
        for command in commands:
            bar.set_description(f"steer {command.name}")
            requests = [
                Request(key=f"steer/{i}", prompt=chat_prompt(backend.tokenizer, user_message(p, command, i)),
                        preset=preset, seed=seed, n=1, max_tokens=max_tokens)
                for i, p in enumerate(prompts) for seed in seeds
            ]
            got = {}
            for completion in backend.generate(requests):
                got[(completion.key, completion.seed)] = completion
                tokens += completion.n_tokens
                bar.update(1)
            for request in requests:  # a fixed order: prompt, then seed
                samples.append(_sample(command, request, got[(request.key, request.seed)]))
            if not progress:
                log(f"steer {command.name}: {len(requests)} samples done")
    per_prompt, summary = summarize(samples, commands)
    return {"prompts": list(prompts), "samples": samples, "per_prompt": per_prompt, "summary": summary,
            "generation": {"samples": len(samples), "tokens": tokens, "seconds": time.perf_counter() - start}}


def chat_prompt(tokenizer, message: str) -> str:
    """The model's chat template around one user message, generation prompt added (as tasks do)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)


def _sample(command: Command, request: Request, completion) -> dict:
    if not completion.temperatures or not completion.top_ps:
        raise SteerError(f"{request.key} under {command.name!r}: the backend returned no per-token T/P "
                         f"(steering needs an AutoDeco model)")
    temps, top_ps = completion.temperatures, completion.top_ps
    index = int(request.key.rsplit("/", 1)[1])
    return {"prompt_index": index, "command": command.name, "text": command.wording(index), "seed": request.seed,
            "n_tokens": completion.n_tokens, "finish_reason": completion.finish_reason,
            "response": completion.text, "temperature_mean": statistics.fmean(temps),
            "top_p_mean": statistics.fmean(top_ps), "trace": {"T": compact(temps), "P": compact(top_ps)}}


def summarize(samples: list[dict], commands: list[Command]) -> tuple[list[dict], dict]:
    """Per (prompt, command) means over seeds and their deltas to the baseline; per command the
    Table 4 quantities (see the module docstring)."""
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for s in samples:
        groups[(s["prompt_index"], s["command"])].append(s)
    prompts = sorted({i for i, _ in groups})
    base = baseline_of(commands).name
    means = {}
    for command in commands:
        for i in prompts:
            group = groups.get((i, command.name))
            if not group:
                raise SteerError(f"no samples for prompt {i} under command {command.name!r}")
            means[(i, command.name)] = (statistics.fmean(s["temperature_mean"] for s in group),
                                        statistics.fmean(s["top_p_mean"] for s in group))
    per_prompt, summary = [], {}
    for command in commands:
        is_base = command.name == base
        deltas = []
        for i in prompts:
            (t, p), (t0, p0) = means[(i, command.name)], means[(i, base)]
            delta = None if is_base else (t - t0, p - p0)
            deltas.append(delta)
            per_prompt.append({"prompt_index": i, "command": command.name, "temperature_mean": t, "top_p_mean": p,
                               "delta_temperature": None if is_base else delta[0],
                               "delta_top_p": None if is_base else delta[1]})
        avg_t = statistics.fmean(means[(i, command.name)][0] for i in prompts)
        avg_p = statistics.fmean(means[(i, command.name)][1] for i in prompts)
        avg_t0 = statistics.fmean(means[(i, base)][0] for i in prompts)
        avg_p0 = statistics.fmean(means[(i, base)][1] for i in prompts)
        sign = DIRECTIONS.get(command.direction or "", 0)
        summary[command.name] = {
            "direction": command.direction, "n_prompts": len(prompts),
            "n_samples": sum(len(groups[(i, command.name)]) for i in prompts),
            "temperature_mean": avg_t, "top_p_mean": avg_p,
            "delta_temperature": None if is_base else avg_t - avg_t0,
            "delta_top_p": None if is_base else avg_p - avg_p0,
            "consistency_temperature": None if is_base else sum(sign * d[0] > 0 for d in deltas) / len(prompts),
            "consistency_top_p": None if is_base else sum(sign * d[1] > 0 for d in deltas) / len(prompts),
        }
    return per_prompt, summary


# ---------------------------------------------------------------------------------------------
# The results file

def write_steering(out: str | Path, config: dict, measured: dict) -> Path:
    """``<out>/<config["model_name"]>/steer_<timestamp>.json`` (atomic); returns its path."""
    folder = Path(out) / config["model_name"]
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"kind": "steering", "config": config, **measured, "git_hash": git_hash(), "date": time.time()}
    path = folder / f"steer_{timestamp()}.json"
    atomic_write(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return path


def run_config(model: str, model_path: str, model_name: str, backend: str, config: SteerConfig,
               seeds: list[int], max_tokens: int) -> dict:
    """The file's ``config`` block."""
    return {"model": model, "model_path": model_path, "model_name": model_name, "backend": backend,
            "decoding": "autodeco", "seeds": list(seeds), "max_tokens": max_tokens,
            "n_prompts": len(config.prompts), "config_file": config.path,
            "baseline": baseline_of(config.commands).name,
            "commands": [{"name": c.name, "text": list(c.text) if isinstance(c.text, tuple) else c.text,
                          "direction": c.direction} for c in config.commands],
            "targeted_training": targeted_training(model_path)}


def targeted_training(model_path: str | Path) -> dict | None:
    """What `autodeco train-steer` recorded next to these heads (`STEER_PROVENANCE`), or None."""
    path = Path(model_path) / STEER_PROVENANCE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SteerError(f"{path}: unreadable steering provenance ({err})") from None
    if not isinstance(data, dict):
        raise SteerError(f"{path}: expected a JSON object")
    return data
