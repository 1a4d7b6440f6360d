"""What `autodeco train` adds to TRL's ``SFTConfig``: the AutoDeco fields, free of torch/TRL.

The full training config is ``heads.training.trainer.AutoDecoTrainingConfig`` — TRL's
``SFTConfig`` (every transformers/TRL trainer field: ``learning_rate``, ``max_steps``, ``bf16``,
``deepspeed``, ...) with these fields mixed in. This half stays light so that the command line
lists its flags without importing TRL; a YAML (``configs/train/*.yaml``) or a flag may set any
field of either half, and the one config mechanism (`harness.core.config`) checks names and types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.core.config import FieldError

DEFAULT_LOSS_CHUNK = 256  # = heads.training.loss.DEFAULT_CHUNK
HIDDEN_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto + heads.training.hidden_cache.DTYPES
HIDDEN_CACHE_FILLS = ("first_epoch", "before")


@dataclass
class AutoDecoArguments:
    """The AutoDeco half of the training config (model, data, heads, loss)."""

    model: str = field(default="smollm2", metadata={
        "help": "base causal LM (smollm2, a configs/models preset, a folder, a hub id) or an AutoDeco folder"})
    train_file: str = field(default="", metadata={"help": "JSONL with prompt/completion rows, or several comma-separated (required)"})
    max_rows: int = field(default=0, metadata={"help": "use only the first N rows (0: all)"})
    train_temperature: bool = field(default=True, metadata={"help": "train the temperature head (and its loss)"})
    train_top_p: bool = field(default=True, metadata={"help": "train the top-p head (and its loss)"})
    use_enhanced_features: bool = field(default=True, metadata={
        "help": "top-p head reads max-prob/entropy/var/top-5 features"})
    head_width: int = field(default=256, metadata={"help": "hidden width of each head MLP"})
    alpha: float = field(default=30.0, metadata={"help": "steepness of the soft top-p mask"})
    easy_token_drop: float = field(default=0.6, metadata={"help": "drop prob. of tokens where base argmax == label"})
    easy_token_scope: str = field(default="temperature", metadata={
        "help": "which loss the dropped easy tokens leave: temperature (the official trainer) or both",
        "choices": ("temperature", "both")})
    dft_weighting: bool = field(default=True, metadata={"help": "weight token losses by the base prob. of the label"})
    min_temperature: float = field(default=1e-2, metadata={"help": "floor on T inside the loss"})
    loss_chunk_size: int = field(default=DEFAULT_LOSS_CHUNK, metadata={
        "help": "positions per loss chunk (memory O(chunk x V))"})
    hidden_cache: str = field(default="auto", metadata={
        "help": "train from a cache of the frozen base's last hidden states (one base forward over the data, then "
                "epochs without it): auto (under $AUTODECO_HOME/hidden-cache when it fits on disk), off, or a folder"})
    hidden_cache_fill: str = field(default="first_epoch", metadata={
        "help": "when a new cache is written: first_epoch (the first epoch's steps run the base and store what it "
                "gives, so the cache costs no pass of its own) or before (one base forward over the data before the "
                "first step); before is used anyway with several processes, dataloader workers, a resumed run or "
                "a storage dtype other than the base's", "choices": HIDDEN_CACHE_FILLS})
    hidden_cache_dtype: str = field(default="auto", metadata={
        "help": "storage dtype of the cached hidden states: auto (the base's own: exact), float32, bfloat16, float16",
        "choices": HIDDEN_CACHE_DTYPES})
    wandb_project: str = field(default="autodeco", metadata={"help": "W&B project of the training run"})

    def check(self) -> None:
        """Raise `FieldError` for the first field out of range (the mechanism adds the source)."""
        for ok, name, message in (
            (self.train_temperature or self.train_top_p, "train_top_p", "enable at least one head (train_temperature/train_top_p)"),
            (0.0 <= self.easy_token_drop <= 1.0, "easy_token_drop", "must be in [0, 1]"),
            (self.easy_token_scope in ("temperature", "both"), "easy_token_scope", "must be temperature or both"),
            (self.alpha > 0, "alpha", "must be > 0"),
            (self.head_width >= 1, "head_width", "must be >= 1"),
            (self.max_rows >= 0, "max_rows", "must be >= 0"),
            (0 < self.min_temperature, "min_temperature", "must be > 0"),
            (self.loss_chunk_size >= 1, "loss_chunk_size", "must be >= 1"),
            (bool(self.hidden_cache.strip()), "hidden_cache", "must be auto, off or a folder"),
            (self.hidden_cache_fill in HIDDEN_CACHE_FILLS, "hidden_cache_fill",
             f"must be one of {', '.join(HIDDEN_CACHE_FILLS)}"),
            (self.hidden_cache_dtype in HIDDEN_CACHE_DTYPES, "hidden_cache_dtype",
             f"must be one of {', '.join(HIDDEN_CACHE_DTYPES)}"),
        ):
            if not ok:
                raise FieldError(name, message)
