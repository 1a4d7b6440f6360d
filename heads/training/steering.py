"""Steering training: teach trained AutoDeco heads to follow decoding commands (the paper's Table 4
"targeted training", whose code was never released).

Data (`heads.training.steer_data`): triples of contexts — a prompt alone, the prompt + a "lower
randomness" command, the prompt + a "higher diversity" command — followed by the same sampled
completion tokens, as cached hidden states of the frozen base. Per triple, the heads' mean
prediction over the completion tokens under each context (T̄₀ baseline, T̄₋ lower, T̄₊ higher; the
same for P) is ranked by a pairwise loss on g(x̄), with g the log-odds of T̄/2 and of P̄
(``rank_space: logit``, the default: a margin asks a like move near P̄ = 1, where one in value
cannot be reached) or g(x̄) = x̄ (``value``):

    rank(x̄) = mean over triples of  ℓ(g(x̄₀) − g(x̄₋) − m) + ℓ(g(x̄₊) − g(x̄₀) − m)
    ℓ(d) = max(0, −d)              (hinge: zero once the ordering holds by the margin m)
    ℓ(d) = s · log(1 + exp(−d/s))  (logistic, scale s = ``softness``: never exactly zero)

With ``rank_unit: token`` the same ℓ is taken per completion position on g(x) of that position's
prediction (the three contexts share the completion, so positions line up), averaged over the
positions and then the triples: every token must move, not a few by a lot (README "Steering by
commands" compares the two on held-out prompts; neither settles it on SmolLM2).

The objective of one step is

    rank(T̄; margin_temperature) + top_p_weight · rank(P̄; margin_top_p)
        + anchor_weight · anchor + autodeco_weight · AutoDeco loss

- anchor: under the baseline context, the squared difference of each position's log-odds of
  T/2 (and of P) from the starting heads' (a frozen copy): without a command, decoding stays where
  it was — the ranking alone is cheapest to satisfy by moving everything to T = 1, P = 0.5, where
  the sigmoids are steepest;
- AutoDeco loss: the usual objective (`heads.training.loss.autodeco_loss`: temperature + soft
  top-p loss, easy-token masking, DFT weights, its defaults) on ``autodeco_rows`` rows of
  ``train_file`` — the data the heads were trained on, so in-domain decoding keeps what that
  training taught.

The temperature head reads only the hidden state, so T̄ covers every completion position of the
``batch_size`` triples at little cost; the top-p head also reads features of softmax(logits / T),
whose logits (``lm_head(hidden)``) are recomputed per step, so P̄ is estimated on
``top_p_positions`` random positions of the first ``top_p_triples`` triples (the same positions
under the three contexts). Only head parameters get gradients.

`train_steering(cfg)` writes into ``output_dir``: ``final/`` (heads-only AutoDeco folder, loadable
like any other, + ``steering_training.json``: `harness.steer.STEER_PROVENANCE`),
``log_history.jsonl`` (one line per ``logging_steps``), ``steer_train_config.yaml`` and the data
cache ``steer_data.pt``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from harness.backends import get_backend
from harness.core.files import atomic_folder, atomic_write, atomic_write_json, check_output_folder
from harness.models import check_model, require_autodeco, resolve_path
from harness.steer import STEER_PROVENANCE, load_config
from heads.model import AutoDecoModelForCausalLM, predict, weight_files
from heads.training.loss import autodeco_loss
from heads.training.steer_config import SteerTrainingConfig
from heads.training.steer_data import (
    CACHE_FILE,
    SteerData,
    build,
    cache_key,
    check_steer_config,
    load_rows,
    training_prompts,
    wordings,
)

LOG_FILE = "log_history.jsonl"
CONFIG_FILE = "steer_train_config.yaml"

__all__ = ["masked_mean", "ranking_terms", "ranking_loss", "ordering", "steer_loss", "train_steering"]


# ---------------------------------------------------------------------------------------------
# The loss


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim of ``values`` where ``mask`` is true ([..., L] -> [...])."""
    weight = mask.to(values.dtype)
    return (values * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)


def ranking_terms(baseline: torch.Tensor, lower: torch.Tensor, higher: torch.Tensor, margin: float,
                  kind: str = "hinge", softness: float = 0.02) -> torch.Tensor:
    """The two pairwise terms' sum, elementwise (any shape): lower below baseline and higher above
    it, each by ``margin`` (see the module docstring)."""
    gaps = torch.stack([baseline - lower - margin, higher - baseline - margin])
    if kind == "hinge":
        terms = F.relu(-gaps)
    elif kind == "logistic":
        terms = softness * F.softplus(-gaps / softness)
    else:
        raise ValueError(f"ranking_loss: kind must be hinge or logistic, got {kind!r}")
    return terms.sum(0)


def ranking_loss(baseline: torch.Tensor, lower: torch.Tensor, higher: torch.Tensor, margin: float,
                 kind: str = "hinge", softness: float = 0.02) -> torch.Tensor:
    """Pairwise ranking of per-triple means [N]: the mean over triples of `ranking_terms`."""
    return ranking_terms(baseline, lower, higher, margin, kind, softness).mean()


def ordering(baseline: torch.Tensor, lower: torch.Tensor, higher: torch.Tensor) -> dict:
    """Fraction of triples ordered as commanded (ties do not count) and the mean gaps."""
    return {"lower_ordered": float((lower < baseline).float().mean()),
            "higher_ordered": float((higher > baseline).float().mean()),
            "lower_delta": float((lower - baseline).mean()), "higher_delta": float((higher - baseline).mean())}


def to_rank_space(means: torch.Tensor, top: float, space: str) -> torch.Tensor:
    """Mean T or P where they are ranked: as they are (``value``), or as the log-odds of
    ``means / top`` (``logit``; T lives in (0, 2), P in (0, 1)), where a margin asks a like move at
    any operating point: near P̄ = 1 a margin in value is out of reach, in log-odds it is not."""
    return means if space == "value" else torch.logit(means / top, eps=1e-6)


def _rank(values: torch.Tensor, means: torch.Tensor, mask: torch.Tensor, top: float, margin: float,
          cfg: SteerTrainingConfig) -> torch.Tensor:
    """The ranking term of one quantity: on the per-triple means ``means`` [B, 3] (``rank_unit:
    triple``), or on every valid position of ``values`` [B, 3, L] (``token``: the pairwise loss per
    position, then its mean over the valid positions of each triple, then over triples)."""
    if cfg.rank_unit == "triple":
        g = to_rank_space(means, top, cfg.rank_space)
        return ranking_loss(g[:, 0], g[:, 1], g[:, 2], margin, cfg.rank_loss, cfg.softness)
    g = to_rank_space(values, top, cfg.rank_space)  # [B, 3, L]
    terms = ranking_terms(g[:, 0], g[:, 1], g[:, 2], margin, cfg.rank_loss, cfg.softness)  # [B, L]
    return masked_mean(terms, mask).mean()


def _log_odds_gap(values: torch.Tensor, reference: torch.Tensor, top: float) -> torch.Tensor:
    """Squared difference of log-odds (of ``values / top``): the heads' pre-sigmoid outputs, where
    a drift towards T = 0 or P = 1 costs what it changes, not what it moves in value."""
    return (torch.logit(values / top, eps=1e-6) - torch.logit(reference / top, eps=1e-6)) ** 2


def _heads(model):
    return [p for head in (model.temp_head, model.top_p_head) for p in head.parameters()]


@torch.no_grad()
def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The frozen base's logits from its last hidden state (``lm_head``), float32."""
    return model.llm.get_output_embeddings()(hidden).float()


def _positions(mask: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``k`` random valid positions per row of ``mask`` [N, L]: (index [N, k], valid [N, k])."""
    scores = torch.rand(mask.shape, generator=generator).masked_fill(~mask, 2.0)  # invalid sort last
    index = scores.argsort(dim=1)[:, : min(k, mask.shape[1])]
    return index, mask.gather(1, index)


def frozen_heads(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A frozen copy of the model's (temperature, top-p) heads: the reference the anchor term keeps
    the no-command predictions at."""
    heads = copy.deepcopy((model.temp_head, model.top_p_head))
    for head in heads:
        head.requires_grad_(False)
    return heads


def steer_loss(model, data: SteerData, batch: torch.Tensor, cfg: SteerTrainingConfig, generator: torch.Generator,
               reference: tuple[torch.nn.Module, torch.nn.Module] | None = None) -> tuple[torch.Tensor, dict]:
    """The objective of one step on the triples ``batch`` (indices into ``data.triples``), and
    what is logged about it. ``reference``: the starting heads (`frozen_heads`) for the anchor term."""
    triples = data.triples[batch]  # [B, 3]
    hidden, mask = data.hidden[triples], data.mask[triples]  # [B, 3, L, H], [B, 3, L]
    temperature = model.temp_head(hidden)  # [B, 3, L]
    t_values = masked_mean(temperature, mask)  # [B, 3]
    rank_t = _rank(temperature, t_values, mask[:, 0], 2.0, cfg.margin_temperature, cfg)
    loss, stats = rank_t, {"rank_temperature": rank_t.item(), "temperature_mean": t_values[:, 0].mean().item()}
    stats.update({f"temperature_{k}": v for k, v in ordering(*t_values.detach().unbind(1)).items()})
    anchored = cfg.anchor_weight > 0 and reference is not None
    if anchored:  # the baseline context's T where the starting heads put it, position by position
        with torch.no_grad():
            t_ref = reference[0](hidden[:, 0])
        anchor = masked_mean(_log_odds_gap(temperature[:, 0], t_ref, 2.0), mask[:, 0]).mean()
    if cfg.top_p_weight > 0:  # on the batch's first top_p_triples triples, at top_p_positions positions each
        first = slice(0, cfg.top_p_triples)
        index, valid = _positions(mask[first, 0], cfg.top_p_positions, generator)  # the completion's positions
        picked = hidden[first].gather(2, index[:, None, :, None].expand(-1, 3, -1, hidden.shape[-1]))  # [b, 3, k, H]
        logits = _logits(model, picked)
        _, top_p = model.heads_forward(picked, logits)
        p_values = masked_mean(top_p, valid[:, None, :].expand(-1, 3, -1))
        rank_p = _rank(top_p, p_values, valid, 1.0, cfg.margin_top_p, cfg)
        loss = loss + cfg.top_p_weight * rank_p
        stats.update(rank_top_p=rank_p.item(), top_p_mean=p_values[:, 0].mean().item())
        stats.update({f"top_p_{k}": v for k, v in ordering(*p_values.detach().unbind(1)).items()})
        if anchored:
            with torch.no_grad():
                _, p_ref, _, _ = predict(*reference, picked[:, 0], logits[:, 0])
            anchor = anchor + masked_mean(_log_odds_gap(top_p[:, 0], p_ref, 1.0), valid).mean()
    if anchored:
        loss = loss + cfg.anchor_weight * anchor
        stats["anchor"] = anchor.item()
    if cfg.autodeco_weight > 0 and data.anchor_hidden is not None:
        rows = torch.randint(len(data.anchor_hidden), (cfg.autodeco_rows,), generator=generator)
        labels = data.anchor_labels[rows]
        width = int((labels != -100).any(0).nonzero().max()) + 1  # the padding that these rows all share: cut
        rows_hidden, labels = data.anchor_hidden[rows, :width], labels[:, :width]
        logits = _logits(model, rows_hidden)
        temperature, top_p = model.heads_forward(rows_hidden, logits)
        out = autodeco_loss(logits, temperature, top_p, labels, generator=generator)
        loss = loss + cfg.autodeco_weight * out.loss
        stats.update(autodeco_loss=out.loss.item(), temp_loss=out.temp_loss.item(),
                     top_p_loss=None if out.top_p_loss is None else out.top_p_loss.item())
    stats["loss"] = loss.item()
    return loss, stats


@torch.no_grad()
def measure_ordering(model, data: SteerData, cfg: SteerTrainingConfig, batch_size: int = 64) -> dict:
    """Teacher-forced ordering on every triple: T̄ over every completion position, P̄ over a fixed
    seeded subset of ``top_p_positions`` positions (as in training)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    t_all, p_all = [], []
    for start in range(0, len(data.triples), batch_size):
        triples = data.triples[start : start + batch_size]
        hidden, mask = data.hidden[triples], data.mask[triples]
        t_all.append(masked_mean(model.temp_head(hidden), mask))
        index, valid = _positions(mask[:, 0], cfg.top_p_positions, generator)
        picked = hidden.gather(2, index[:, None, :, None].expand(-1, 3, -1, hidden.shape[-1]))
        _, top_p = model.heads_forward(picked, _logits(model, picked))
        p_all.append(masked_mean(top_p, valid[:, None, :].expand(-1, 3, -1)))
    t_means, p_means = torch.cat(t_all), torch.cat(p_all)
    return {"temperature": {"baseline": float(t_means[:, 0].mean()), **ordering(*t_means.unbind(1))},
            "top_p": {"baseline": float(p_means[:, 0].mean()), **ordering(*p_means.unbind(1))}}


# ---------------------------------------------------------------------------------------------
# Training


def check_inputs(cfg: SteerTrainingConfig):
    """Everything the user gave, before a model is loaded or a file written: (model path, steering
    config, AutoDeco rows)."""
    config = load_config(cfg.steer_config)
    check_steer_config(config)
    rows = load_rows(cfg)
    check_output_folder(cfg.output_dir, "output_dir")
    path = resolve_path(cfg.init_from)
    check_model(path)
    require_autodeco(path, "steering training continues trained AutoDeco heads (init_from)")
    return path, config, rows


def train_steering(cfg: SteerTrainingConfig, *, log=print) -> Path:
    """Build (or reuse) the data, train the heads, write ``output_dir`` (see the module docstring);
    returns the ``final/`` folder."""
    path, config, rows = check_inputs(cfg)
    out = Path(cfg.output_dir)
    progress = not cfg.no_progress
    torch.manual_seed(cfg.seed)
    model = AutoDecoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = _tokenizer(path, model)
    out.mkdir(parents=True, exist_ok=True)
    key = cache_key(cfg, config, rows, weight_files(Path(path))[0])
    data = SteerData.load(out / CACHE_FILE, key)
    if data is None:
        data = build(cfg, config, rows, get_backend(cfg.sample_backend, path), model, tokenizer, progress=progress)
        data.save(out / CACHE_FILE, key)
        log(f"steering data: {data.info['n_triples']} triples from {data.info['n_completions']} completions of "
            f"{data.info['n_prompts']} prompts, {data.info['n_lower_wordings']} + {data.info['n_higher_wordings']} "
            f"wordings, {data.info['n_autodeco_rows']} AutoDeco rows ({data.info['seconds']:.0f} s)")
    else:
        log(f"steering data: reused {out / CACHE_FILE} ({data.info['n_triples']} triples)")
    before = measure_ordering(model, data, cfg)
    log(f"before: {_describe(before)}")
    atomic_write(out / CONFIG_FILE, yaml.safe_dump(asdict(cfg), sort_keys=False))
    seconds = optimize(model, data, cfg, out / LOG_FILE, progress=progress)
    after = measure_ordering(model, data, cfg)
    log(f"after {cfg.max_steps} steps ({seconds:.0f} s): {_describe(after)}")
    final = out / "final"
    with atomic_folder(final, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / STEER_PROVENANCE, provenance(cfg, path, config, data, before, after, seconds))
    return final


def optimize(model, data: SteerData, cfg: SteerTrainingConfig, log_path: Path, *, progress: bool = True) -> float:
    """``max_steps`` AdamW steps on the heads (linear decay to 0; batches of ``batch_size`` triples,
    reshuffled each epoch), one `log_history.jsonl` line per ``logging_steps``; returns the seconds."""
    from tqdm import tqdm

    reference = frozen_heads(model)
    params = _heads(model)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / cfg.max_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    start, order = time.perf_counter(), torch.empty(0, dtype=torch.long)
    with log_path.open("w") as handle, tqdm(range(1, cfg.max_steps + 1), desc="steer-train", unit="step",
                                            disable=not progress, dynamic_ncols=True) as bar:
        for step in bar:
            if len(order) < cfg.batch_size:  # a new epoch: reshuffle
                order = torch.cat([order, torch.randperm(len(data.triples), generator=generator)])
            batch, order = order[: cfg.batch_size], order[cfg.batch_size :]
            loss, stats = steer_loss(model, data, batch, cfg, generator, reference)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                row = {"step": step, **stats, "learning_rate": schedule.get_last_lr()[0],
                       "seconds": time.perf_counter() - start}
                handle.write(json.dumps(row) + "\n")
                handle.flush()
    return time.perf_counter() - start


def _tokenizer(path: str, model):
    """The folder's tokenizer; a heads-only folder without one uses its base's."""
    from transformers import AutoTokenizer

    has_own = (Path(path) / "tokenizer_config.json").is_file()
    return AutoTokenizer.from_pretrained(path if has_own else model.config.base_model_name_or_path)


def provenance(cfg: SteerTrainingConfig, init_from: str, config, data: SteerData, before: dict, after: dict,
               seconds: float) -> dict:
    """What `harness.steer.targeted_training` reads back: where the heads came from and what they
    were trained on (so a report can check that its evaluation prompts and wordings were unseen)."""
    return {"init_from": str(Path(init_from).resolve()), "steer_config": str(cfg.steer_config),
            "train_file": cfg.train_file or None, "prompts": training_prompts(cfg, config),
            "lower_wordings": wordings(config.commands, "lower"), "higher_wordings": wordings(config.commands, "higher"),
            "data": data.info, "train_seconds": seconds, "ordering_before": before, "ordering_after": after,
            "config": asdict(cfg)}


def _describe(measured: dict) -> str:
    """One line: teacher-forced ordering of the training triples."""
    parts = []
    for name, short in (("temperature", "T"), ("top_p", "P")):
        m = measured[name]
        parts.append(f"{short} {m['baseline']:.3f}, lower {m['lower_delta']:+.3f} ({100 * m['lower_ordered']:.0f}% "
                     f"ordered), higher {m['higher_delta']:+.3f} ({100 * m['higher_ordered']:.0f}%)")
    return "; ".join(parts) + " (teacher-forced, training triples)"
