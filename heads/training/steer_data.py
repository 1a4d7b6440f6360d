"""Steering training data: triples of contexts that share one completion, as cached hidden states.

The base is frozen and only the heads train, so everything the base computes is computed once:

1. completions: every training prompt (no command) is sampled ``completions_per_prompt`` times
   per preset of ``sample_decoding`` by the model before steering training (default its own
   `autodeco` preset, i.e. as `autodeco steer` generates; a hotter static preset beside it gives
   the heads text like what they meet once a command has raised T), ``completion_tokens`` tokens
   each, seeded per sample;
2. wordings: each completion gets ``pairs_per_completion`` (lower, higher) wording pairs, dealt
   from shuffled decks so that every wording is used about equally often;
3. contexts: the prompt alone, and the prompt with each wording appended to the user message after
   one space (`harness.steer.user_message`), in the chat template (`harness.steer.chat_prompt`),
   followed by the completion's token ids — the same tokens under every context, so only the
   command differs. One base forward per context (the baseline context is shared by a
   completion's pairs) keeps the last hidden state at the positions that predict the completion's
   tokens (the last prompt token up to the last-but-one completion token);
4. triples: (baseline, lower, higher) rows of those contexts;
5. AutoDeco rows: the ``train_file`` rows (prompt/completion, as `autodeco train` reads them;
   EOS appended to the completion as TRL does) get the same treatment, from the last prompt token
   on, with their labels (-100 first, then the completion tokens): the AutoDeco loss needs only
   hidden states, labels and the base logits, which are ``lm_head(hidden)`` (exactly: the hidden
   state is the decoder's final output) and are recomputed per step instead of cached.

`build` returns a `SteerData`; ``save``/``load`` keep it in ``<output_dir>/steer_data.pt`` under a
key over everything it depends on, so a second run with other loss settings skips steps 1-5.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from harness.backends import Request
from harness.decoding import parse_specs
from harness.steer import Command, SteerConfig, SteerError, baseline_of, chat_prompt, user_message
from heads.training.steer_config import SteerTrainingConfig
from heads.training.trainer import read_prompt_completion

CACHE_FILE = "steer_data.pt"
MIN_COMPLETION_TOKENS = 4  # shorter samples (an early EOS) carry too few positions to rank
ANCHOR_MAX_TOKENS = 256  # AutoDeco rows: completion tokens kept per row
FORWARD_BATCH = 8  # contexts per base forward


@dataclass
class SteerData:
    """Cached hidden states of the steering contexts and of the AutoDeco rows."""

    hidden: torch.Tensor  # [contexts, L, H] float32; position j predicts completion token j
    mask: torch.Tensor  # [contexts, L] bool: j < the completion's length
    triples: torch.Tensor  # [N, 3] long: context rows (baseline, lower, higher)
    anchor_hidden: torch.Tensor | None  # [rows, L2, H]: from the last prompt token on
    anchor_labels: torch.Tensor | None  # [rows, L2] long: -100, the completion tokens, -100 padding
    info: dict = field(default_factory=dict)  # counts, wordings, seconds (provenance)

    def save(self, path: Path, key: str) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"key": key, **asdict(self)}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, key: str) -> SteerData | None:
        """The cached data when its key matches, else None."""
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, weights_only=True)
        except Exception:  # a damaged cache is rebuilt, never trusted
            return None
        if not isinstance(stored, dict) or stored.pop("key", None) != key:
            return None
        return cls(**stored)


def wordings(commands: list[Command], direction: str) -> list[str]:
    """Every wording of the config's commands that point in ``direction``, in file order."""
    return [w for c in commands if c.direction == direction for w in c.wordings]


def check_steer_config(config: SteerConfig) -> None:
    """Training needs a baseline and at least one wording per direction."""
    baseline_of(config.commands)
    for direction in ("lower", "higher"):
        if not wordings(config.commands, direction):
            raise SteerError(f"{config.path}: no command with direction {direction}: steering training needs "
                             f"wordings for both directions")


def cache_key(cfg: SteerTrainingConfig, config: SteerConfig, rows: list[dict], heads_file: Path) -> str:
    """Everything the cached data depends on: the model (heads file bytes' size and mtime, base
    path), prompts, wordings, AutoDeco rows and the data fields of the config."""
    stat = heads_file.stat()
    parts = {
        "init_from": str(Path(cfg.init_from).resolve()), "heads": [stat.st_size, stat.st_mtime_ns],
        "prompts": config.prompts, "lower": wordings(config.commands, "lower"),
        "higher": wordings(config.commands, "higher"), "rows": rows,
        **{k: getattr(cfg, k) for k in ("max_prompts", "completions_per_prompt", "completion_tokens",
                                        "pairs_per_completion", "sample_decoding", "sample_under_commands", "seed")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Building


def training_prompts(cfg: SteerTrainingConfig, config: SteerConfig) -> list[str]:
    return config.prompts[: cfg.max_prompts] if cfg.max_prompts else list(config.prompts)


def build(cfg: SteerTrainingConfig, config: SteerConfig, rows: list[dict], backend, model, tokenizer, *,
          progress: bool = True) -> SteerData:
    """Steps 1-5 of the module docstring: the completions from ``backend`` (any engine loaded on
    ``cfg.init_from``; closed once they are sampled), the hidden states from ``model`` (the same
    folder as an `AutoDecoModelForCausalLM`)."""
    start = time.perf_counter()
    prompts = training_prompts(cfg, config)
    lower, higher = wordings(config.commands, "lower"), wordings(config.commands, "higher")
    try:
        completions = sample_completions(backend, prompts, cfg, lower, higher, progress=progress)
    finally:
        backend.close()
    sampled = time.perf_counter() - start
    pairs = deal_pairs(len(completions), lower, higher, cfg.pairs_per_completion, cfg.seed)

    contexts: list[tuple[list[int], list[int]]] = []  # (prompt ids, completion ids)
    triples = []
    for (prompt_index, ids), completion_pairs in zip(completions, pairs, strict=True):
        prompt = prompts[prompt_index]
        baseline_row = len(contexts)
        contexts.append((_prompt_ids(tokenizer, prompt, None), ids))
        for low_text, high_text in completion_pairs:
            contexts.append((_prompt_ids(tokenizer, prompt, low_text), ids))
            contexts.append((_prompt_ids(tokenizer, prompt, high_text), ids))
            triples.append((baseline_row, len(contexts) - 2, len(contexts) - 1))
    hidden, mask = context_hidden(model, contexts, cfg.completion_tokens, progress=progress)
    anchor_hidden, anchor_labels = anchor_rows(model, tokenizer, rows, progress=progress) if rows else (None, None)
    info = {
        "n_prompts": len(prompts), "n_completions": len(completions), "n_contexts": len(contexts),
        "n_triples": len(triples), "n_autodeco_rows": len(rows), "n_lower_wordings": len(lower),
        "n_higher_wordings": len(higher), "completion_tokens_mean": float(mask.sum(1).float().mean()),
        "sampling_seconds": sampled, "seconds": time.perf_counter() - start,
    }
    return SteerData(hidden, mask, torch.tensor(triples, dtype=torch.long), anchor_hidden, anchor_labels, info)


def sample_completions(backend, prompts: list[str], cfg: SteerTrainingConfig, lower: list[str], higher: list[str], *,
                       progress: bool = True) -> list[tuple[int, list[int]]]:
    """(prompt index, completion token ids) for every prompt × sampling context × preset × sample;
    samples shorter than `MIN_COMPLETION_TOKENS` are left out. The sampling contexts are the
    prompt alone and, with ``sample_under_commands``, the prompt with one lower and one higher
    wording (dealt like the pairs, with another seed): then the heads also see text as the base
    writes it under a command — a command changes what is written, not only how it is scored."""
    from tqdm import tqdm

    presets = parse_specs(cfg.sample_decoding)
    for preset in presets:
        backend.check_preset(preset)
    contexts = [[None] for _ in prompts]
    if cfg.sample_under_commands:
        dealt = deal_pairs(len(prompts), lower, higher, 1, cfg.seed + 1)
        contexts = [[None, low, high] for (low, high), in dealt]
    requests = [(i, Request(key=f"steer-train/{i}/{k}/{j}", preset=preset, seed=cfg.seed,
                            prompt=chat_prompt(backend.tokenizer, user_message(p, Command("command", wording))),
                            n=cfg.completions_per_prompt, max_tokens=cfg.completion_tokens))
                for i, p in enumerate(prompts) for k, wording in enumerate(contexts[i])
                for j, preset in enumerate(presets)]
    got = {}
    with tqdm(total=len(requests) * cfg.completions_per_prompt, desc="sample completions", unit="sample",
              disable=not progress, dynamic_ncols=True) as bar:
        for completion in backend.generate([r for _, r in requests]):
            got[(completion.key, completion.sample_index)] = list(completion.token_ids or [])
            bar.update(1)
    out = []
    for i, request in requests:
        for index in range(cfg.completions_per_prompt):
            ids = got[(request.key, index)]
            if len(ids) >= MIN_COMPLETION_TOKENS:
                out.append((i, ids))
    if not out:
        raise SteerError(f"no completion of at least {MIN_COMPLETION_TOKENS} tokens was sampled "
                         f"(raise completion_tokens or completions_per_prompt)")
    return out


def deal_pairs(n: int, lower: list[str], higher: list[str], per_item: int, seed: int) -> list[list[tuple[str, str]]]:
    """``per_item`` (lower, higher) pairs for each of ``n`` items, dealt from decks reshuffled each
    time they run out (seeded): every wording is used ⌊uses⌋ or ⌈uses⌉ times, and one item never
    gets the same wording twice unless a deck is smaller than ``per_item``."""
    rng = random.Random(seed)

    def dealer(words: list[str]):
        deck: list[str] = []
        while True:
            if not deck:
                deck = rng.sample(words, len(words))
            yield deck.pop()

    lows, highs = dealer(lower), dealer(higher)
    return [[(next(lows), next(highs)) for _ in range(per_item)] for _ in range(n)]


def _prompt_ids(tokenizer, prompt: str, wording: str | None) -> list[int]:
    """The chat-templated prompt with ``wording`` appended to the user message (None: no command)."""
    text = chat_prompt(tokenizer, user_message(prompt, Command("command", wording)))
    return tokenizer(text, add_special_tokens=False).input_ids


@torch.no_grad()
def decoder_hidden(model, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The base's last hidden state [B, S, H] (the decoder's output: what `base_forward` hands the
    heads and what ``lm_head`` turns into the base logits), without computing the logits."""
    return model.llm.get_decoder()(input_ids=ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _forward_windows(model, sequences: list[list[int]], starts: list[int], lengths: list[int], width: int,
                     desc: str, progress: bool) -> torch.Tensor:
    """Hidden states [N, width, H] at positions start .. start + length - 1 of each sequence (zeros
    beyond), in right-padded batches (causal attention: padding after a token never reaches it)."""
    from tqdm import tqdm

    hidden_size = model.config.temperature_hidden_size
    out = torch.zeros(len(sequences), width, hidden_size)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths share a batch
    for begin in tqdm(range(0, len(order), FORWARD_BATCH), desc=desc, unit="batch", disable=not progress,
                      dynamic_ncols=True):
        batch = order[begin : begin + FORWARD_BATCH]
        longest = max(len(sequences[i]) for i in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        attention = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            attention[row, : len(sequences[i])] = 1
        hidden = decoder_hidden(model, ids, attention).float()
        for row, i in enumerate(batch):
            out[i, : lengths[i]] = hidden[row, starts[i] : starts[i] + lengths[i]]
    return out


def context_hidden(model, contexts: list[tuple[list[int], list[int]]], width: int, *,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [C, width, H], mask [C, width]) at the positions predicting each completion token."""
    sequences = [p + c for p, c in contexts]
    starts = [len(p) - 1 for p, _ in contexts]
    lengths = [len(c) for _, c in contexts]
    hidden = _forward_windows(model, sequences, starts, lengths, width, "score contexts", progress)
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return hidden, mask


def anchor_rows(model, tokenizer, rows: list[dict], *, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [R, L, H], labels [R, L]) of the AutoDeco rows from the last prompt token on."""
    sequences, starts, lengths, label_rows = [], [], [], []
    for row in rows:
        prompt = row["prompt"]
        if not isinstance(prompt, str):  # conversational rows: the messages in the chat template
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        completion = row["completion"]
        if not isinstance(completion, str):
            completion = "".join(message.get("content", "") for message in completion)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        completion_ids = tokenizer(completion, add_special_tokens=False).input_ids[:ANCHOR_MAX_TOKENS]
        if tokenizer.eos_token_id is not None and (not completion_ids or completion_ids[-1] != tokenizer.eos_token_id):
            completion_ids.append(tokenizer.eos_token_id)
        sequences.append(prompt_ids + completion_ids)
        starts.append(len(prompt_ids) - 1)
        lengths.append(len(completion_ids) + 1)
        label_rows.append([-100] + completion_ids)
    width = max(lengths)
    hidden = _forward_windows(model, sequences, starts, lengths, width, "score AutoDeco rows", progress)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row_labels in enumerate(label_rows):
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    return hidden, labels


def load_rows(cfg: SteerTrainingConfig) -> list[dict]:
    """The AutoDeco rows (`read_prompt_completion`: errors name the file and line), or none."""
    if cfg.autodeco_weight == 0 or not cfg.train_file:
        return []
    return read_prompt_completion(cfg.train_file, cfg.max_rows)
