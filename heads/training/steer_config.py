"""What `autodeco train-steer` takes: one dataclass, free of torch (the CLI lists its flags cheaply).

Steering training teaches already-trained AutoDeco heads to follow decoding commands in the
prompt ("be as certain as possible" → lower T and P, "be more diverse" → higher), as the paper's
Table 4 "targeted training" does: a pairwise ranking loss on the heads' mean T and P over the same
completion tokens under three contexts, plus the usual AutoDeco loss so that decoding without a
command stays what it was. `heads.training.steering` runs it; `heads.training.steer_data` builds
the data. A ``--config`` YAML (configs/train/smollm2_steer.yaml) or a flag may set any field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.core.config import FieldError
from harness.core.paths import CONFIGS_DIR

RANK_LOSSES = ("hinge", "logistic")
RANK_SPACES = ("logit", "value")
RANK_UNITS = ("triple", "token")


@dataclass
class SteerTrainingConfig:
    """Data, loss and optimisation of steering training (every field a flag and a YAML key)."""

    init_from: str = field(default="", metadata={
        "help": "a trained AutoDeco model folder: its heads are the starting point (required)"})
    steer_config: str = field(default=str(CONFIGS_DIR / "steer" / "train.yaml"), metadata={
        "help": "steering YAML with the training prompts and the command wordings (text lists) per direction"})
    output_dir: str = field(default="runs/steer", metadata={
        "help": "final/ (the steered heads), log_history.jsonl, steer_train_config.yaml, steer_data.pt (cache)"})
    train_file: str = field(default="", metadata={
        "help": "prompt/completion JSONL for the AutoDeco loss term (the heads' usual training rows); "
                "required when autodeco_weight > 0"})
    max_rows: int = field(default=0, metadata={"help": "use only the first N rows of train_file (0: all)"})
    # -- data
    max_prompts: int = field(default=0, metadata={"help": "use only the first N prompts of steer_config (0: all)"})
    completions_per_prompt: int = field(default=2, metadata={
        "help": "completions sampled per prompt (without a command) by the model before steering training"})
    completion_tokens: int = field(default=48, metadata={"help": "tokens per sampled completion"})
    pairs_per_completion: int = field(default=2, metadata={
        "help": "(lower, higher) wording pairs scored on each completion: one triple each"})
    sample_decoding: str = field(default="autodeco", metadata={
        "help": "preset(s) the completions are sampled with, comma-separated: completions_per_prompt each "
                "(autodeco: as `autodeco steer` generates)"})
    sample_under_commands: bool = field(default=False, metadata={
        "help": "also sample each prompt under one lower and one higher wording (3x the completions): the "
                "heads then also learn on text written under a command"})
    sample_backend: str = field(default="hf", metadata={
        "help": "engine that samples the completions (vllm: faster for many prompts, slower to start)",
        "choices": ("hf", "vllm")})
    # -- loss
    rank_loss: str = field(default="hinge", metadata={
        "help": "pairwise ranking loss on the per-context mean T/P", "choices": RANK_LOSSES})
    rank_space: str = field(default="logit", metadata={
        "help": "how the per-context means are compared: logit (log-odds of mean T/2 and mean P; margins in "
                "log-odds, reachable near P = 1) or value", "choices": RANK_SPACES})
    rank_unit: str = field(default="triple", metadata={
        "help": "what is ranked: each triple's mean over the completion (triple) or every completion token's "
                "prediction (token: the hinge per position, averaged; asks for a shift at every token, not a "
                "few large ones)", "choices": RANK_UNITS})
    margin_temperature: float = field(default=0.1, metadata={
        "help": "mean T under a lower (higher) command should sit this far below (above) the baseline's"})
    margin_top_p: float = field(default=0.05, metadata={"help": "the same margin for the mean top-p"})
    softness: float = field(default=0.02, metadata={"help": "scale of the logistic ranking loss"})
    top_p_weight: float = field(default=1.0, metadata={
        "help": "weight of the top-p ranking term (0: rank T only)"})
    top_p_triples: int = field(default=4, metadata={
        "help": "triples of each step's batch whose top-p is ranked (the top-p head needs full-vocabulary "
                "logits: far costlier than the temperature head)"})
    top_p_positions: int = field(default=8, metadata={
        "help": "completion positions per context at which the top-p head is run for its ranking term "
                "(a random subset each step)"})
    anchor_weight: float = field(default=10.0, metadata={
        "help": "weight of the mean squared difference between the heads' T (and P) without a command and "
                "the starting heads' (keeps decoding without a command where it was; 0: off)"})
    autodeco_weight: float = field(default=1.0, metadata={
        "help": "weight of the AutoDeco loss on train_file rows (0: ranking only)"})
    autodeco_rows: int = field(default=4, metadata={"help": "train_file rows in each step's AutoDeco term"})
    # -- optimisation
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the heads"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "triples per step"})
    seed: int = field(default=0, metadata={"help": "sampling, wording assignment, batches, positions"})
    logging_steps: int = field(default=10, metadata={"help": "a log_history.jsonl line every N steps"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bars"})

    def check(self) -> None:
        """Raise `FieldError` for the first field out of range (the mechanism adds the source)."""
        for ok, name, message in (
            (bool(self.init_from), "init_from", "is required: a trained AutoDeco model folder"),
            (bool(self.steer_config), "steer_config", "is required"),
            (bool(self.output_dir), "output_dir", "is required"),
            (self.max_rows >= 0, "max_rows", "must be >= 0"),
            (self.max_prompts >= 0, "max_prompts", "must be >= 0"),
            (1 <= self.completions_per_prompt <= 64, "completions_per_prompt", "must be in 1..64"),
            (2 <= self.completion_tokens <= 1024, "completion_tokens", "must be in 2..1024"),
            (1 <= self.pairs_per_completion <= 64, "pairs_per_completion", "must be in 1..64"),
            (self.rank_loss in RANK_LOSSES, "rank_loss", f"must be one of {', '.join(RANK_LOSSES)}"),
            (self.rank_space in RANK_SPACES, "rank_space", f"must be one of {', '.join(RANK_SPACES)}"),
            (self.rank_unit in RANK_UNITS, "rank_unit", f"must be one of {', '.join(RANK_UNITS)}"),
            (0 <= self.margin_temperature <= 10, "margin_temperature", "must be in [0, 10]"),
            (0 <= self.margin_top_p <= 10, "margin_top_p", "must be in [0, 10]"),
            (self.softness > 0, "softness", "must be > 0"),
            (self.top_p_weight >= 0, "top_p_weight", "must be >= 0"),
            (self.sample_backend in ("hf", "vllm"), "sample_backend", "must be hf or vllm"),
            (1 <= self.top_p_triples <= 4096, "top_p_triples", "must be in 1..4096"),
            (1 <= self.top_p_positions <= 1024, "top_p_positions", "must be in 1..1024"),
            (self.anchor_weight >= 0, "anchor_weight", "must be >= 0"),
            (self.autodeco_weight >= 0, "autodeco_weight", "must be >= 0"),
            (self.autodeco_weight == 0 or bool(self.train_file), "train_file",
             "is required when autodeco_weight > 0 (the AutoDeco loss needs its rows)"),
            (1 <= self.autodeco_rows <= 1024, "autodeco_rows", "must be in 1..1024"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (1 <= self.max_steps <= 1_000_000, "max_steps", "must be in 1..1000000"),
            (1 <= self.batch_size <= 4096, "batch_size", "must be in 1..4096"),
            (self.seed >= 0, "seed", "must be >= 0"),
            (self.logging_steps >= 1, "logging_steps", "must be >= 1"),
        ):
            if not ok:
                raise FieldError(name, message)
        from harness.decoding import PresetError, parse_specs

        try:
            parse_specs(self.sample_decoding)
        except PresetError as err:
            raise FieldError("sample_decoding", str(err)) from None
