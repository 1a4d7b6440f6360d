"""Decoding presets: how the next token is chosen, as plain data plus one optional logits function.

A preset is a frozen ``DecodingPreset``: the sampling knobs every engine knows (``temperature``,
``top_p``, ``top_k``, ``min_p``), which AutoDeco heads act (``heads``), and for the adaptive
baselines an extra ``processor()`` — a pure function ``logits[B, V] -> logits[B, V]`` applied to
the raw logits *before* temperature, top-k, top-p and min-p. Both backends use that same order:

    logits ─► processor (top-n-sigma | edt | eta) ─► / temperature ─► top-k ─► top-p ─► min-p ─► sample

The HF backend runs ``warp()`` (this pipeline) on the logits; the vLLM backend maps the knobs onto
``SamplingParams`` and wraps ``processor()`` itself.

Presets are registered by name (``@preset("name")``) and built with ``get_preset(name, **params)``;
``parse_spec("static:temperature=0.6,top_p=0.95")`` reads the CLI form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from harness.core.errors import UserError
from harness.core.files import read_json

if TYPE_CHECKING:  # torch is imported inside the functions so that `autodeco --help` stays instant
    import torch

LogitsFn = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class DecodingPreset:
    name: str
    params: dict = field(default_factory=dict)  # the user-facing parameters, for configs and keys
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    heads: tuple[bool, bool] | None = None  # (temperature head, top-p head) for AutoDeco presets
    extra: str | None = None  # name of the extra processor in PROCESSORS, or None
    extra_params: dict = field(default_factory=dict)  # its keyword arguments

    @property
    def key(self) -> str:
        """Canonical string naming this preset and its parameters (used in store keys)."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in sorted(self.params.items()))

    def describe(self) -> dict:
        """The ``config.decoding`` block of a results file."""
        return {
            "name": self.name,
            "params": dict(self.params),
            "key": self.key,
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "heads": list(self.heads) if self.heads else None,
        }

    def processor(self) -> LogitsFn | None:
        """The extra raw-logits function (top-n-sigma, edt, eta), or None."""
        if self.extra is None:
            return None
        return PROCESSORS[self.extra](**self.extra_params)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """The whole pipeline on ``[B, V]`` float logits; returns logits with -inf for dropped tokens."""
        fn = self.processor()
        if fn is not None:
            logits = fn(logits)
        if not self.do_sample:
            return logits
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.top_k > 0:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p < 1.0:
            logits = top_p_filter(logits, self.top_p)
        if self.min_p > 0.0:
            logits = min_p_filter(logits, self.min_p)
        return logits


def _fmt(value) -> str:
    return repr(round(value, 6)) if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# Filters and the adaptive baselines' processors (pure tensor functions, shared by backends)

NEG_INF = float("-inf")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    import torch

    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest top set whose probability mass reaches ``p`` (at least one token)."""
    import torch

    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p (Nguyen et al. 2024): drop tokens with p < min_p · p_max."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(dim=-1, keepdim=True)


def top_n_sigma(n: float = 1.0) -> LogitsFn:
    """Top-nσ (Tang et al. 2024): keep tokens whose logit ≥ max − n·σ over the finite logits."""

    def fn(logits: torch.Tensor) -> torch.Tensor:
        import torch

        finite = torch.isfinite(logits)
        count = finite.sum(dim=-1, keepdim=True).clamp(min=1)
        zeroed = logits.masked_fill(~finite, 0.0)
        mean = zeroed.sum(dim=-1, keepdim=True) / count
        var = ((zeroed - mean) ** 2).masked_fill(~finite, 0.0).sum(dim=-1, keepdim=True) / count
        top = logits.max(dim=-1, keepdim=True).values
        return logits.masked_fill(logits < top - n * var.sqrt(), NEG_INF)

    return fn


def edt(t0: float = 1.0, base: float = 0.8, theta: float = 1.0) -> LogitsFn:
    """Entropy-based dynamic temperature (Zhang et al. 2024): T = t0 · base^(θ / H)."""

    def fn(logits: torch.Tensor) -> torch.Tensor:
        entropy = _entropy(logits).clamp(min=1e-6)
        temperature = (t0 * base ** (theta / entropy)).clamp(min=1e-4)
        return logits / temperature

    return fn


def eta(epsilon: float = 0.0009) -> LogitsFn:
    """η-sampling (Hewitt et al. 2022): drop tokens with p < min(ε, √ε·exp(−H)); keep the top one."""

    def fn(logits: torch.Tensor) -> torch.Tensor:
        import torch

        probs = logits.softmax(dim=-1)
        threshold = torch.minimum(
            torch.full_like(probs[..., :1], epsilon), math.sqrt(epsilon) * torch.exp(-_entropy(logits))
        )
        drop = probs < threshold
        drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
        return logits.masked_fill(drop, NEG_INF)

    return fn


PROCESSORS: dict[str, Callable[..., LogitsFn]] = {"top-n-sigma": top_n_sigma, "edt": edt, "eta": eta}


# ---------------------------------------------------------------------------------------------
# The registry

PRESETS: dict[str, Callable[..., DecodingPreset]] = {}
STRING_PARAMS = ("source", "task")  # parameters read as text (a file path, a task name); the rest are numbers
PRESET_HELP: dict[str, str] = {}


class PresetError(UserError, ValueError):
    """Unknown preset or bad preset parameter."""


def preset(name: str, help: str):
    def register(build: Callable[..., DecodingPreset]):
        PRESETS[name] = build
        PRESET_HELP[name] = help
        return build

    return register


@preset("greedy", "argmax decoding (seeds and samples are all identical)")
def _greedy() -> DecodingPreset:
    return DecodingPreset("greedy", do_sample=False)


@preset("default", "plain sampling, T=1, P=1")
def _default() -> DecodingPreset:
    return DecodingPreset("default")


@preset("static", "fixed temperature / top_p / top_k (e.g. static:temperature=0.6,top_p=0.95)")
def _static(temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> DecodingPreset:
    _check(temperature > 0, "temperature must be > 0")
    _check(0 < top_p <= 1, "top_p must be in (0, 1]")
    _check(top_k >= 0, "top_k must be >= 0")
    params = {"temperature": float(temperature), "top_p": float(top_p)}
    if top_k:
        params["top_k"] = int(top_k)
    return DecodingPreset("static", params, temperature=temperature, top_p=top_p, top_k=int(top_k))


@preset("autodeco", "AutoDeco: both heads set T_t and P_t per token (needs an AutoDeco model)")
def _autodeco() -> DecodingPreset:
    return DecodingPreset("autodeco", heads=(True, True))


@preset("autodeco-temp", "AutoDeco temperature head only (P=1)")
def _autodeco_temp() -> DecodingPreset:
    return DecodingPreset("autodeco-temp", heads=(True, False))


@preset("autodeco-top-p", "AutoDeco top-p head only (T=1)")
def _autodeco_top_p() -> DecodingPreset:
    return DecodingPreset("autodeco-top-p", heads=(False, True))


@preset("meanshift", "static T and P at the mean of an AutoDeco model's own predictions (SimpleDeco's MeanShift): "
                     "meanshift:source=RESULTS.json[,task=NAME] reads them from an AutoDeco run's results file; "
                     "or meanshift:temperature=T,top_p=P")
def _meanshift(temperature: float | None = None, top_p: float | None = None, source: str = "",
               task: str = "") -> DecodingPreset:
    """A static (T, P) pair named for where it came from: the ``temperature_mean`` and ``top_p_mean``
    that an AutoDeco run measured over its generated tokens on ``task`` (stored in the params)."""
    if source:
        _check(temperature is None and top_p is None, "give source= or temperature=/top_p=, not both")
        temperature, top_p, task = _measured_means(source, task)
    _check(temperature is not None and top_p is not None, "needs source=RESULTS.json or temperature= and top_p=")
    _check(isinstance(temperature, (int, float)) and temperature > 0, "temperature must be > 0")
    _check(isinstance(top_p, (int, float)) and 0 < top_p <= 1, "top_p must be in (0, 1]")
    temperature, top_p = round(float(temperature), 4), round(float(top_p), 4)
    params = {"temperature": temperature, "top_p": top_p} | ({"source": source, "task": task} if source else {})
    return DecodingPreset("meanshift", params, temperature=temperature, top_p=top_p)


def _measured_means(source: str, task: str) -> tuple[float, float, str]:
    results = read_json(source, PresetError).get("results")
    _check(isinstance(results, dict) and results, f"{source}: no `results` block")
    if not task:
        _check(len(results) == 1, f"{source} holds tasks {', '.join(results)}: name one with task=")
        task = next(iter(results))
    _check(task in results, f"{source} has no task {task!r} (it has {', '.join(results)})")
    metrics = results[task]
    _check(metrics.get("temperature_mean") is not None and metrics.get("top_p_mean") is not None,
           f"{source}: task {task!r} has no temperature_mean/top_p_mean (not an AutoDeco run)")
    return float(metrics["temperature_mean"]), float(metrics["top_p_mean"]), task


@preset("recommended", "the model's own generation_config.json temperature / top_p / top_k "
                       "(default sampling, with a note, where it has none)")
def _recommended(temperature: float | None = None, top_p: float | None = None, top_k: int = 0) -> DecodingPreset:
    """Bare ``recommended`` is resolved per model by ``for_model`` (the parameters are then what the
    model's file says); ``recommended:temperature=...`` pins them."""
    if temperature is None and top_p is None:
        return DecodingPreset("recommended")  # unresolved: for_model fills it in
    temperature, top_p = 1.0 if temperature is None else temperature, 1.0 if top_p is None else top_p
    _check(temperature > 0 and 0 < top_p <= 1 and top_k >= 0, "need temperature > 0, top_p in (0, 1], top_k >= 0")
    params = {"temperature": float(temperature), "top_p": float(top_p)} | ({"top_k": int(top_k)} if top_k else {})
    return DecodingPreset("recommended", params, temperature=temperature, top_p=top_p, top_k=int(top_k))


def for_model(preset: DecodingPreset, model_path: str, log: Callable[[str], None] = print) -> DecodingPreset:
    """Presets that depend on the model, resolved for one: ``recommended`` reads the model's
    ``generation_config.json`` (a local folder's file; hub ids through transformers). Others pass."""
    if preset.name != "recommended" or preset.params:
        return preset
    found = _generation_defaults(model_path)
    if not found:
        log(f"note: {model_path} recommends no sampling settings (no temperature/top_p in its "
            f"generation_config.json); `recommended` = default sampling (T=1, P=1) for it")
        found = {"temperature": 1.0, "top_p": 1.0}
    return get_preset("recommended", **found)


def _generation_defaults(model_path: str) -> dict:
    folder = Path(model_path)
    if folder.is_dir():
        file = folder / "generation_config.json"
        config = read_json(file, PresetError) if file.is_file() else {}
    else:
        from transformers import GenerationConfig  # heavy; hub ids only

        try:
            config = GenerationConfig.from_pretrained(model_path).to_dict()
        except OSError:
            config = {}
    if not config.get("do_sample", True) or config.get("temperature") is None and config.get("top_p") is None:
        return {}
    found = {"temperature": config.get("temperature") or 1.0, "top_p": config.get("top_p") or 1.0}
    if config.get("top_k") and int(config["top_k"]) != 50:  # 50 is transformers' default, not the model's advice
        found["top_k"] = int(config["top_k"])
    return found


@preset("min-p", "min-p sampling (min_p=0.1, temperature=1.0)")
def _min_p(min_p: float = 0.1, temperature: float = 1.0) -> DecodingPreset:
    _check(0 < min_p <= 1, "min_p must be in (0, 1]")
    _check(temperature > 0, "temperature must be > 0")
    params = {"min_p": float(min_p), "temperature": float(temperature)}
    return DecodingPreset("min-p", params, temperature=temperature, min_p=min_p)


@preset("top-n-sigma", "top-nσ: keep logits within n standard deviations of the max (n=1.0)")
def _top_n_sigma(n: float = 1.0, temperature: float = 1.0) -> DecodingPreset:
    _check(n > 0, "n must be > 0")
    _check(temperature > 0, "temperature must be > 0")
    params = {"n": float(n)} | ({"temperature": float(temperature)} if temperature != 1.0 else {})
    return DecodingPreset(
        "top-n-sigma", params, temperature=temperature, extra="top-n-sigma", extra_params={"n": float(n)}
    )


@preset("edt", "entropy-based dynamic temperature T = t0 · base^(theta/H) (t0=1, base=0.8, theta=1)")
def _edt(t0: float = 1.0, base: float = 0.8, theta: float = 1.0) -> DecodingPreset:
    _check(t0 > 0 and 0 < base < 1 and theta > 0, "need t0 > 0, 0 < base < 1, theta > 0")
    params = {"t0": float(t0), "base": float(base), "theta": float(theta)}
    return DecodingPreset("edt", params, extra="edt", extra_params=params)


@preset("eta", "η-sampling: drop tokens below min(ε, √ε·e^-H) (epsilon=0.0009)")
def _eta(epsilon: float = 0.0009) -> DecodingPreset:
    _check(0 < epsilon < 1, "epsilon must be in (0, 1)")
    params = {"epsilon": float(epsilon)}
    return DecodingPreset("eta", params, extra="eta", extra_params=params)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PresetError(message)


def get_preset(name: str, **params) -> DecodingPreset:
    """Build a registered preset; unknown names or parameters raise ``PresetError``."""
    if name not in PRESETS:
        raise PresetError(f"unknown decoding preset {name!r}; known: {', '.join(PRESETS)}")
    build = PRESETS[name]
    allowed = build.__code__.co_varnames[: build.__code__.co_argcount]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise PresetError(
            f"preset {name!r} takes no parameter {', '.join(unknown)}; it takes: {', '.join(allowed) or 'none'}"
        )
    try:
        return build(**params)
    except PresetError as err:
        given = ", ".join(f"{k}={v}" for k, v in params.items())
        raise PresetError(f"preset {name!r}: {err}" + (f" (given: {given})" if given else "")) from None


def parse_spec(spec: str) -> DecodingPreset:
    """``"name"`` or ``"name:key=value,key=value"`` → preset (numbers parsed as int or float)."""
    name, _, rest = spec.strip().partition(":")
    params = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise PresetError(f"bad decoding parameter {item!r} in {spec!r}; expected key=value")
        key = key.strip().replace("-", "_")
        params[key] = value.strip() if key in STRING_PARAMS else _number(value.strip(), spec)
    return get_preset(name, **params)


def parse_specs(text: str) -> list[DecodingPreset]:
    """Several presets in one string: ``"greedy,default,static:temperature=0.7,top_p=0.9,autodeco"``.

    Parameters always read ``key=value``, so a comma-separated part without ``=`` starts the next
    preset and a part with one continues the current preset's parameters. Repeats are refused.
    """
    groups: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part and groups:
            groups[-1] += "," + part
        else:
            groups.append(part)
    if not groups:
        raise PresetError("no decoding preset given")
    presets = [parse_spec(group) for group in groups]
    keys = [p.key for p in presets]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise PresetError(f"decoding preset given twice: {', '.join(repeated)}")
    return presets


def _number(text: str, spec: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise PresetError(f"decoding parameter value {text!r} in {spec!r} is not a number") from None
    if not math.isfinite(value):
        raise PresetError(f"decoding parameter value {text!r} in {spec!r} is not a finite number")
    return value
