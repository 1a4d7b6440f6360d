"""Training the AutoDeco heads on a frozen base with TRL's SFTTrainer.

Data: JSONL rows ``{"prompt": ..., "completion": ...}`` (the prompt already carries the chat
template, as `autodeco data reject-sample` writes it; conversational rows — lists of messages —
work too). TRL tokenizes them and masks the prompt (completion-only loss: labels -100).

Per step, `AutoDecoTrainer.compute_loss` runs the base forward under ``no_grad``, the heads with
gradients, and `heads.training.loss.autodeco_loss` (temperature + soft top-p loss, easy-token masking
seeded by (seed, step), DFT weights). With ``hidden_cache`` on (the default ``auto``), the base's
last hidden states are stored once (`heads.training.hidden_cache`) — by the first epoch's steps,
which run the base on their rows, store what it gives and train on its logits
(``hidden_cache_fill: first_epoch``), or in one pass before the first step (``before``) — and
every later step reads its rows' hidden states from that cache while `autodeco_loss_from_hidden`
recomputes the logits with the output embedding alone: the same objective, same data order and
easy-token draws, without the base forward.

Only head parameters are trainable; checkpoints (``checkpoint-<step>/``, ``final/``) hold config +
head tensors only and load with ``AutoDecoModelForCausalLM.from_pretrained``. Every logged step
appends one JSON line to ``<output_dir>/log_history.jsonl``: step, loss, temp_loss, top_p_loss,
temperature_mean, temperature_std, top_p_mean, top_p_std, tokens_per_second (+ learning_rate,
grad_norm, epoch).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from harness.core.config import FieldError
from harness.core.errors import ConfigError, UserError
from harness.core.files import atomic_write, check_output_folder, iter_jsonl
from harness.core.paths import autodeco_home
from harness.core.seeds import stable_seed
from harness.models import is_autodeco, resolve_model
from harness.tracking import resolve_mode
from heads.model import AutoDecoModelForCausalLM
from heads.training import hidden_cache
from heads.training.config import AutoDecoArguments
from heads.training.loss import autodeco_loss, autodeco_loss_from_hidden

HEAD_PREFIXES = ("temp_head.", "top_p_head.")
LOG_FILE = "log_history.jsonl"
CONFIG_FILE = "train_config.yaml"
CACHE_ROW = "cache_row"  # the training dataset's column naming each row's place in the hidden-state cache
CACHE_ROWS = "cache_rows"  # a batch of rows the cache does not hold yet: the step computes and stores them

__all__ = ["AutoDecoTrainer", "AutoDecoTrainingConfig", "LogHistoryCallback", "train"]


# --------------------------------------------------------------------------------------------
# The config: TRL's SFTConfig + the AutoDeco fields


@dataclass
class AutoDecoTrainingConfig(SFTConfig, AutoDecoArguments):
    """Everything `autodeco train` needs: every ``SFTConfig`` field plus `AutoDecoArguments`.

    Only defaults differ from TRL's, where the paper's recipe (configs/train/paper.yaml) or a
    frozen base asks for it.
    """

    output_dir: str | None = field(default="runs/train", metadata={"help": "checkpoints, log_history.jsonl, final/"})
    learning_rate: float = 5e-6
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    num_train_epochs: float = 1.0
    max_length: int | None = 16384
    logging_steps: float = 1
    optim: str = "adamw_torch"
    completion_only_loss: bool | None = True  # the prompt is context, not a target
    gradient_checkpointing: bool = False  # the base is frozen: nothing to checkpoint
    report_to: None | str | list[str] = "wandb"  # offline files unless logged in

    def __post_init__(self):
        if not torch.cuda.is_available():  # transformers refuses bf16 on a CPU unless told it is one
            self.use_cpu = True
        super().__post_init__()

    def check(self) -> None:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        AutoDecoArguments.check(self)
        report_to = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        unknown = [name for name in report_to if name not in (*INTEGRATION_TO_CALLBACK, "none", "all")]
        if unknown:
            raise FieldError("report_to", f"{unknown[0]!r} is not a logger; known: none, all, "
                                          f"{', '.join(INTEGRATION_TO_CALLBACK)}")
        for ok, name, message in (
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1"),
            (self.max_length is None or self.max_length >= 2, "max_length", "must be >= 2"),
            (self.save_steps > 0, "save_steps", "must be > 0"),
        ):
            if not ok:
                raise FieldError(name, message)

    @property
    def uses_wandb(self) -> bool:
        return "wandb" in (self.report_to or [])

    def to_dict(self) -> dict:
        """Every field as plain YAML-able values (what ``train_config.yaml`` holds)."""
        return {spec.name: _plain_value(getattr(self, spec.name)) for spec in dataclasses.fields(self)}


def _plain_value(value):
    """Enums (transformers' ``SchedulerType``, ...) as their value, containers element-wise."""
    if isinstance(value, enum.Enum):
        return _plain_value(value.value)
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain_value(v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


# --------------------------------------------------------------------------------------------
# Data


def train_files(spec: str | os.PathLike) -> list[Path]:
    """``train_file``: one JSONL, or several separated by commas (read in that order)."""
    return [Path(part.strip()) for part in str(spec).split(",") if part.strip()]


def read_prompt_completion(spec: str | os.PathLike, max_rows: int = 0) -> list[dict]:
    """Validated prompt/completion rows from one JSONL file or several, comma-separated, in order
    (errors name the file and line). Among several files one may be empty (a reject-sampling run
    that solved nothing); all of them empty is an error."""
    rows, paths = [], train_files(spec)
    for path in paths:
        for number, row in iter_jsonl(path):
            for key in ("prompt", "completion"):
                if not isinstance(row, dict) or not isinstance(row.get(key), (str, list)) or not row.get(key):
                    raise ConfigError(f"{path}:{number}: field {key!r} missing or empty (need prompt and completion)")
            rows.append({"prompt": row["prompt"], "completion": row["completion"]})
            if max_rows and len(rows) >= max_rows:
                return rows
    if not rows:
        raise ConfigError(f"{', '.join(map(str, paths))}: no rows")
    return rows


# --------------------------------------------------------------------------------------------
# The trainer


def mean_std(values: torch.Tensor) -> tuple[float, float]:
    values = values.detach().float()
    if values.numel() == 0:
        return math.nan, math.nan
    return values.mean().item(), (values.std().item() if values.numel() > 1 else 0.0)


def step_seed(seed: int, step: int, micro: int) -> int:
    """The easy-token mask seed of one micro-batch: a pure function of (seed, step, micro-batch)."""
    return stable_seed(seed, step, micro)


def heads_state_dict(model: torch.nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Only the head tensors (from a given full state dict, e.g. gathered by DeepSpeed, or the model)."""
    source = state_dict if state_dict is not None else model.state_dict()
    return {k: v for k, v in source.items() if k.startswith(HEAD_PREFIXES)}


def average_gradients(net: torch.nn.Module) -> None:
    """Average the trainable parameters' gradients over the ranks (all-reduce, then / world size).

    `AutoDecoTrainer.compute_loss` calls the model's ``base_forward`` and ``heads_forward`` on the
    unwrapped module, not through DistributedDataParallel's ``forward``; DDP only reduces gradients
    after its own forward, so without this each rank would step with its own micro-batch's gradient.
    (DeepSpeed reduces in its backward hooks and needs nothing here.)
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    for param in net.parameters():
        if param.requires_grad and param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= world


class CacheCollator:
    """Training batches from the hidden-state cache: the rows its examples' ``cache_row`` names, in
    order (each example's token count is checked against the cache's). While the cache is being
    written (a `hidden_cache.CacheWriter`, during the first epoch), a batch of rows not written yet
    is only their numbers (``cache_rows``): the step runs the base on them and stores the result.
    Examples without a cache row (an evaluation set) go to the trainer's own collator, ``fallback``."""

    def __init__(self, cache: hidden_cache.HiddenCache | hidden_cache.CacheWriter, fallback):
        self.cache, self.fallback = cache, fallback

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples or CACHE_ROW not in examples[0]:
            return self.fallback(examples)
        rows = [example[CACHE_ROW] for example in examples]
        for example, row in zip(examples, rows, strict=True):
            if "input_ids" in example and len(example["input_ids"]) != int(self.cache.tokens[row]):
                raise RuntimeError(f"hidden cache {self.cache.folder}: row {row} has {self.cache.tokens[row]} tokens, "
                                   f"the dataset's {len(example['input_ids'])}")
        if isinstance(self.cache, hidden_cache.CacheWriter) and not self.cache.has(rows):
            return {CACHE_ROWS: torch.tensor(rows)}
        return self.cache.batch(rows)


class AutoDecoTrainer(SFTTrainer):
    """SFTTrainer whose loss is the AutoDeco objective and whose checkpoints hold only the heads."""

    def __init__(self, *args, **kwargs):
        self._micro = (-1, 0)  # (optimizer step, micro-batch index within it): seeds the easy-token mask
        self._hidden_cache: hidden_cache.HiddenCache | None = None
        super().__init__(*args, **kwargs)
        # Our loss is a per-micro-batch mean: the Trainer must average it over accumulation steps.
        self.loss_is_scaled_for_ga = False

    # -- loss ----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.args
        net = self.accelerator.unwrap_model(model)
        step = self.state.global_step
        self._micro = (step, self._micro[1] + 1 if self._micro[0] == step else 0)
        generator = torch.Generator().manual_seed(step_seed(self.args.seed, step, self._micro[1]))
        options = dict(train_temperature=cfg.train_temperature, train_top_p=cfg.train_top_p, alpha=cfg.alpha,
                       easy_token_drop=cfg.easy_token_drop, easy_token_scope=cfg.easy_token_scope,
                       dft_weighting=cfg.dft_weighting, generator=generator, min_temperature=cfg.min_temperature,
                       chunk_size=cfg.loss_chunk_size)
        if CACHE_ROWS in inputs:  # rows the cache does not hold yet (first epoch): run the base, store them
            inputs = self._fill_cache(inputs[CACHE_ROWS].tolist())
        if "hidden" in inputs:  # a batch of the hidden-state cache: no base forward
            output_layer = net.get_output_embeddings()
            out, temperature, top_p = autodeco_loss_from_hidden(
                inputs["hidden"].to(output_layer.weight.dtype), output_layer, net.temp_head, net.top_p_head,
                inputs["targets"], inputs["easy"], inputs["base_prob"], logits=inputs.get("logits"), **options)
            n_tokens = int(inputs["n_tokens"])
        else:
            input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
            with torch.no_grad():
                hidden, base_logits, _ = net.base_forward(input_ids=input_ids, attention_mask=attention_mask,
                                                          use_cache=False)
            temperature, top_p = net.heads_forward(hidden, base_logits)
            out = autodeco_loss(base_logits, temperature, top_p, inputs["labels"], **options)
            completion = inputs["labels"][:, 1:] != -100
            temperature, top_p = temperature[:, :-1][completion], top_p[:, :-1][completion]
            n_tokens = int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
        mode = "train" if model.training else "eval"
        t_mean, t_std = mean_std(temperature)
        p_mean, p_std = mean_std(top_p)
        metrics = self._metrics[mode]
        metrics["temp_loss"].append(out.temp_loss.item())
        if out.top_p_loss is not None:
            metrics["top_p_loss"].append(out.top_p_loss.item())
        metrics["temperature_mean"].append(t_mean)
        metrics["temperature_std"].append(t_std)
        metrics["top_p_mean"].append(p_mean)
        metrics["top_p_std"].append(p_std)
        metrics["kept_tokens"].append(float(out.n_kept))
        metrics["easy_fraction"].append(out.n_easy / max(out.n_tokens, 1))
        self._total_train_tokens += int(self.accelerator.gather_for_metrics(torch.tensor(n_tokens)).sum())
        metrics["num_tokens"] = [self._total_train_tokens]
        return (out.loss, out) if return_outputs else out.loss

    # -- several processes -----------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and self.accelerator.sync_gradients:
            average_gradients(self.accelerator.unwrap_model(model))
        return loss

    # -- heads-only checkpoints ------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        net = self.accelerator.unwrap_model(self.model)
        heads = heads_state_dict(net, state_dict)
        if self.args.should_save:
            net.save_pretrained(output_dir, state_dict=heads)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.is_deepspeed_enabled:  # the engine's checkpoint without the frozen base tensors
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            return
        super()._save_optimizer_and_scheduler(output_dir)

    # -- the hidden-state cache -------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if CACHE_ROW not in self._signature_columns:  # keep the cache's row numbers in the batches
            self._signature_columns = [*self._signature_columns, CACHE_ROW]

    def _hidden_cache_obstacle(self) -> str | None:
        """Why this run cannot train from a hidden-state cache, or None."""
        if self.is_deepspeed_enabled:
            return "DeepSpeed (ZeRO-3 spreads the base over the processes)"
        if self.args.packing or self.args.padding_free or getattr(self, "padding_free", False):
            return "packed or padding-free batches"
        if not isinstance(self.train_dataset, Dataset):
            return "a streamed dataset"
        if not isinstance(self.data_collator, (DataCollatorForLanguageModeling, CacheCollator)):
            return "a custom data collator"
        return None

    def _fill_now(self, resuming: bool, dtype: torch.dtype) -> bool:
        """Whether a new cache can be written by the first epoch's steps (`hidden_cache_fill`):
        one process, no dataloader workers (the collator must see the writer's progress), a fresh
        run (a resumed one skips rows) and the base's own dtype (the step's logits are the base's)."""
        cfg, net = self.args, self.accelerator.unwrap_model(self.model)
        return (cfg.hidden_cache_fill == "first_epoch" and self.accelerator.num_processes == 1
                and cfg.dataloader_num_workers == 0 and not resuming and dtype == net.llm.dtype)

    def _fill_cache(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """A training batch for rows the collator found missing: computed and stored by the writer,
        or read back if the cache was completed since; the cache is finished with its last row."""
        source = self._hidden_cache
        if not isinstance(source, hidden_cache.CacheWriter) or source.has(rows):
            return source.batch(rows)
        inputs = source.compute(rows)
        if not source.missing:
            self._finish_cache()
        return inputs

    def _finish_cache(self) -> None:
        writer = self._hidden_cache
        cache = writer.finish(progress=False)
        self._hidden_cache = self.data_collator.cache = cache
        self._announce(cache, "; written by the first epoch")

    def _announce(self, cache: hidden_cache.HiddenCache, how: str = "") -> None:
        if self.is_world_process_zero():
            print(f"hidden cache: {cache.folder} ({cache.rows} rows, {cache.positions} loss positions, "
                  f"{cache.nbytes / 2**20:.1f} MiB, {str(cache.dtype).removeprefix('torch.')}{how})", flush=True)

    def use_hidden_cache(self, resuming: bool = False) -> hidden_cache.HiddenCache | hidden_cache.CacheWriter | None:
        """Open the hidden-state cache that ``hidden_cache`` asks for, or start a new one — written
        by the first epoch's steps (`hidden_cache_fill`), or built before the first step (one base
        forward over the training set, with a progress bar) — and make the training batches read
        it. None when off."""
        cfg = self.args
        if self._hidden_cache is not None or cfg.hidden_cache == "off":
            return self._hidden_cache
        auto = cfg.hidden_cache == "auto"

        def off(reason: str) -> None:
            if not auto:
                raise ConfigError(f"hidden_cache {cfg.hidden_cache}: {reason} (use hidden_cache off)")
            if self.is_world_process_zero():
                print(f"hidden cache: off ({reason})", flush=True)

        obstacle = self._hidden_cache_obstacle()
        if obstacle:
            return off(f"not with {obstacle}")
        net = self.accelerator.unwrap_model(self.model)
        dataset = self.train_dataset
        columns = dataset.with_format("numpy")  # one int64 array per row, not lists of Python ints
        ids = list(columns["input_ids"])
        rows = list(zip(ids, list(columns["labels"]) if "labels" in dataset.column_names else ids, strict=True))
        dtype = net.llm.dtype if cfg.hidden_cache_dtype == "auto" else hidden_cache.DTYPES[cfg.hidden_cache_dtype]
        root = autodeco_home() / "hidden-cache" if auto else Path(cfg.hidden_cache)
        need = hidden_cache.estimated_bytes(rows, net.config.temperature_hidden_size, dtype)
        free = shutil.disk_usage(next(p for p in (root, *root.parents) if p.exists())).free
        if need > (free // 2 if auto else free):
            return off(f"it needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free under {root}")
        with self.accelerator.local_main_process_first():  # one process per machine builds, the others open it
            try:
                cache = hidden_cache.prepare(
                    net, rows, root, max_length=cfg.max_length, dtype=dtype, batch_size=cfg.per_device_train_batch_size,
                    chunk=cfg.loss_chunk_size, pad_token_id=self._pad_token_id(),
                    progress=not cfg.disable_tqdm and self.is_local_process_zero(),
                    fill_later=self._fill_now(resuming, dtype))
            except hidden_cache.CacheUnusable as err:
                return off(str(err).removeprefix("hidden_cache: "))
        if not isinstance(cache, hidden_cache.CacheWriter):
            self._announce(cache)
        elif self.is_world_process_zero():
            print(f"hidden cache: {cache.folder} is written by the first epoch ({len(rows)} rows)", flush=True)
        self._hidden_cache = cache
        self.train_dataset = dataset.add_column(CACHE_ROW, list(range(len(dataset))))
        self.data_collator = CacheCollator(cache, self.data_collator)
        return cache

    def _pad_token_id(self) -> int:
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        return int(getattr(tokenizer, "pad_token_id", None) or 0)

    def train(self, *args, **kwargs):
        resuming = bool(kwargs.get("resume_from_checkpoint") or (args and args[0]))
        self.use_hidden_cache(resuming)
        try:
            return self._train(*args, **kwargs)
        finally:  # a run that stopped (or ended) before its first epoch did keeps no partial cache
            writer = self._hidden_cache
            if isinstance(writer, hidden_cache.CacheWriter):
                writer.discard()
                self._hidden_cache = None
                if self.is_world_process_zero():
                    done = len(writer.rows) - len(writer.missing)
                    print(f"hidden cache: not kept ({done} of {len(writer.rows)} rows written when training "
                          f"stopped, before the first epoch ended)", flush=True)

    def _train(self, *args, **kwargs):
        if not self.is_deepspeed_enabled:
            return super().train(*args, **kwargs)
        # A DeepSpeed engine checkpoint saved without the frozen base can only load non-strictly.
        import transformers.trainer as hf_trainer

        strict_loader = hf_trainer.deepspeed_load_checkpoint
        hf_trainer.deepspeed_load_checkpoint = lambda engine, path, load_module_strict=True: strict_loader(
            engine, path, load_module_strict=False)
        try:
            return super().train(*args, **kwargs)
        finally:
            hf_trainer.deepspeed_load_checkpoint = strict_loader

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        net = self.accelerator.unwrap_model(model or self.model)
        path = Path(resume_from_checkpoint) / "model.safetensors"
        if not path.is_file():
            raise ValueError(f"no heads checkpoint at {path}")
        heads = load_file(str(path))
        expected = set(heads_state_dict(net))
        if set(heads) != expected:
            raise ValueError(f"{path}: head tensors {sorted(heads)} do not match the model's {sorted(expected)}")
        net.load_state_dict(heads, strict=False)


class LogHistoryCallback(TrainerCallback):
    """Appends one JSON line per logged training step to ``log_history.jsonl`` and prints it."""

    KEYS = ("loss", "temp_loss", "top_p_loss", "temperature_mean", "temperature_std", "top_p_mean",
            "top_p_std", "tokens_per_second", "learning_rate", "grad_norm", "epoch", "kept_tokens",
            "easy_fraction", "num_tokens")

    def __init__(self, output_dir: str | os.PathLike, console: bool = True):
        self.path = Path(output_dir) / LOG_FILE
        self.console = console
        self._last: tuple[float, float] | None = None  # (time, num_tokens) at the previous log

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), 0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now, tokens = time.perf_counter(), float(logs.get("num_tokens", 0.0))
        last_time, last_tokens = self._last or (now, 0.0)
        if tokens < last_tokens:  # resumed: the token counter restarted
            last_tokens = 0.0
        rate = (tokens - last_tokens) / max(now - last_time, 1e-9)
        self._last = (now, tokens)
        row = {"step": state.global_step}
        row.update({k: _plain(logs[k]) for k in self.KEYS if k in logs})
        row["tokens_per_second"] = rate
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.console:
            parts = [f"step {row['step']}"] + [
                f"{k} {row[k]:.4g}" for k in ("loss", "temp_loss", "top_p_loss", "temperature_mean",
                                             "top_p_mean", "tokens_per_second") if isinstance(row.get(k), float)
            ]
            print(" | ".join(parts), flush=True)


def _plain(value):
    return value.item() if hasattr(value, "item") else value


# --------------------------------------------------------------------------------------------
# Putting it together


def build_model(cfg: AutoDecoTrainingConfig):
    """An AutoDeco model whose base is frozen and whose enabled heads are trainable.

    The seed is set first: fresh heads are initialised from it, so two runs with the same config
    and seed start from (and, on the same machine, end with) bit-identical heads.
    """
    from transformers import set_seed

    set_seed(cfg.seed)
    path = resolve_model(cfg.model)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    if is_autodeco(path):
        model = AutoDecoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.config.enable_temperature_head |= cfg.train_temperature
        model.config.enable_top_p_head |= cfg.train_top_p
    else:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model = AutoDecoModelForCausalLM.from_base(
            base, use_enhanced_features=cfg.use_enhanced_features, head_width=cfg.head_width,
            enable_temperature_head=cfg.train_temperature, enable_top_p_head=cfg.train_top_p,
        )
    model.set_decoding(model.config.enable_temperature_head, model.config.enable_top_p_head)
    for name, param in model.named_parameters():
        param.requires_grad = (name.startswith("temp_head.") and cfg.train_temperature) or (
            name.startswith("top_p_head.") and cfg.train_top_p
        )
    return model, path


def _resume_target(cfg: AutoDecoTrainingConfig) -> str | None:
    """The checkpoint folder to resume from (``latest``: the newest ``checkpoint-*`` of output_dir)."""
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        out = Path(cfg.output_dir)
        found = get_last_checkpoint(str(out)) if out.is_dir() else None
        if found is None:
            raise ConfigError(f"resume_from_checkpoint latest: no checkpoint-<step>/ folder in {out}")
        return found
    path = Path(cfg.resume_from_checkpoint)
    if not path.is_dir():
        what = "is a file, not a checkpoint folder" if path.exists() else "does not exist"
        raise ConfigError(f"resume_from_checkpoint: {path} {what}")
    return str(path)


def _checkpoint_step(checkpoint: str) -> int | None:
    """The optimizer step a checkpoint was saved at (its trainer_state.json), or None."""
    state = Path(checkpoint) / "trainer_state.json"
    if not state.is_file():
        return None
    try:
        step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise ConfigError(f"resume_from_checkpoint: {state} is not valid JSON") from None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _planned_steps(trainer: AutoDecoTrainer, cfg: AutoDecoTrainingConfig) -> int | None:
    """The run's total optimizer steps: max_steps, or what the epochs come to (as the Trainer counts)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    initial = getattr(trainer, "set_initial_training_values", None)
    if initial is None:
        return None
    return int(initial(cfg, trainer.get_train_dataloader())[-1])


def train(cfg: AutoDecoTrainingConfig) -> Path:
    """Train the heads; returns the ``final/`` folder.

    Everything the user gave is checked before anything is written to output_dir (train_config.yaml
    comes right before the first step). Resuming from a checkpoint that already reached the run's
    last step does nothing and says so (the Trainer would take one more step at learning rate 0).
    """
    from transformers import AutoTokenizer

    if not cfg.train_file:
        raise ConfigError("train_file is required (in the config or as --train_file)")
    for path in train_files(cfg.train_file):
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "not found"
            raise ConfigError(f"train_file {path}: {what}")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a folder")
    if cfg.hidden_cache not in ("auto", "off"):
        check_output_folder(cfg.hidden_cache, flag="hidden_cache")
    rows = read_prompt_completion(cfg.train_file, cfg.max_rows)
    resume = _resume_target(cfg)
    created = not out.exists()
    try:
        model, base_path = build_model(cfg)
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        trainer = AutoDecoTrainer(  # (creates output_dir)
            model=model,
            args=cfg,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[LogHistoryCallback(out)],
        )
        if resume is not None:
            step, planned = _checkpoint_step(resume), _planned_steps(trainer, cfg)
            if step is not None and planned is not None and step >= planned:
                final = out / "final"
                print(f"nothing to do: {resume} is at step {step} of {planned}, the run is finished "
                      f"(raise max_steps or num_train_epochs to train on)", flush=True)
                return final if (final / "config.json").is_file() else Path(resume)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing of a run that never started
        raise
    atomic_write(out / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _start_wandb(cfg)
    try:
        trainer.train(resume_from_checkpoint=resume)
        final = out / "final"
        trainer.save_model(str(final))
    finally:
        _finish_wandb(cfg)
    return final


def _start_wandb(cfg: AutoDecoTrainingConfig) -> None:
    """Open this run's W&B run under ``output_dir/wandb`` ourselves, with every setting passed as an
    argument (no environment variables): transformers' callback then logs into it (it only opens
    one when none is active). Offline files unless the user is logged in."""
    if not cfg.uses_wandb:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()
    mode = resolve_mode("auto")
    folder = Path(cfg.output_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    wandb.init(project=cfg.wandb_project, dir=str(folder), mode="disabled" if mode == "off" else mode,
               name=cfg.run_name or folder.name, job_type="train", config=cfg.to_dict(),
               settings=wandb.Settings(silent=True, console="off"))


def _finish_wandb(cfg: AutoDecoTrainingConfig) -> None:
    """Close the W&B run this training opened: transformers' callback leaves it open, and the
    next training run in the same process would otherwise log into it (and its folder)."""
    if not cfg.uses_wandb:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()
