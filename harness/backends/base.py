"""What every backend takes and gives back, and the per-sample seeding rule they share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from harness.core.errors import UserError
from harness.core.seeds import stable_seed
from harness.decoding import DecodingPreset
from harness.models import ModelError, is_autodeco, read_config


class BackendError(UserError, RuntimeError):
    """A model or preset a backend cannot serve (shown to the user as a CLI error)."""


@dataclass(frozen=True)
class Request:
    """``n`` samples of one prompt. ``key`` names the prompt (e.g. ``"aime24/3"``).

    ``sample_indices`` says which sample numbers to produce (default ``range(n)``): a resumed run
    asks only for the missing ones, and each sample's randomness depends only on
    (seed, key, sample index) — see ``sample_seed``.
    """

    key: str
    prompt: str
    preset: DecodingPreset
    seed: int
    n: int
    max_tokens: int
    stop: tuple[str, ...] = ()
    sample_indices: tuple[int, ...] | None = None

    @property
    def indices(self) -> tuple[int, ...]:
        return self.sample_indices if self.sample_indices is not None else tuple(range(self.n))


@dataclass
class Completion:
    key: str
    sample_index: int
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    temperatures: list[float] | None = None  # AutoDeco: predicted T per generated token
    top_ps: list[float] | None = None  # AutoDeco: predicted P per generated token
    seed: int = 0
    token_ids: list[int] | None = None  # the n_tokens generated token ids (EOS included when counted)


def sample_seed(seed: int, key: str, sample_index: int) -> int:
    """A 63-bit RNG seed for one sample, independent of batching and of other samples."""
    return stable_seed(seed, key, sample_index)


def token_texts(tokenizer, ids: Sequence[int], stride: int = 1) -> list[str]:
    """The text of each run of ``stride`` consecutive generated tokens (the last run may be shorter).

    Decoded as the whole generation is (special tokens skipped, so EOS is ``""``): the pieces
    concatenate to ``tokenizer.decode(ids, skip_special_tokens=True)``. Incremental — each run is
    decoded after the previous run as context (SentencePiece drops a leading space without it), and
    a run ending inside a multi-byte character gets ``""`` while the next run takes the character.
    A tokenizer whose decoding is not incremental falls back to decoding growing prefixes.
    """
    ids = list(ids)
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=True)  # noqa: E731
    ends = list(range(stride, len(ids), stride)) + [len(ids)] if ids else []
    pieces, start, read = [], 0, 0  # ids[start:read] = the context (the last run already emitted)
    for end in ends:
        before, after = decode(ids[start:read]), decode(ids[start:end])
        if end < len(ids) and after.endswith("\ufffd"):  # inside a character: wait for its other bytes
            pieces.append("")
            continue
        pieces.append(after[len(before):] if after.startswith(before) else after)
        start, read = read, end
    full = decode(ids)
    if "".join(pieces) == full:
        return pieces
    texts = [decode(ids[:end]) for end in ends]
    return [text[len(prev):] if text.startswith(prev) else text for prev, text in zip(["", *texts[:-1]], texts, strict=True)]


class Backend:
    """Base class: subclasses set ``name``, ``tokenizer``, ``is_autodeco`` and implement ``generate``."""

    name = "base"
    tokenizer = None
    is_autodeco = False
    model_path = ""

    def generate(self, requests: list[Request]) -> Iterator[Completion]:
        raise NotImplementedError

    def check_preset(self, preset: DecodingPreset) -> None:
        if preset.heads is not None and not self.is_autodeco:
            raise BackendError(
                f"decoding preset {preset.name!r} needs an AutoDeco model; {self.model_path} is a plain causal LM"
            )

    def load_heads(self, model_path: str) -> bool:
        """Swap in the heads of another AutoDeco checkpoint of the same base, without reloading.

        True when done (``model_path`` then names the new checkpoint); False when this backend
        or pair of checkpoints cannot (then the caller loads a fresh backend). Used to evaluate
        every checkpoint of a training run on one engine.
        """
        return False

    def close(self) -> None:
        """Free the engine (optional)."""


IGNORED_CONFIG_KEYS = ("_name_or_path", "transformers_version")


def same_base_and_heads(path_a: str, path_b: str) -> bool:
    """Both folders are AutoDeco checkpoints whose configs agree (same base, same head layout)."""
    try:
        a, b = read_config(path_a), read_config(path_b)
    except ModelError:
        return False
    if not (is_autodeco(a) and is_autodeco(b)):
        return False
    strip = lambda c: {k: v for k, v in c.items() if k not in IGNORED_CONFIG_KEYS}  # noqa: E731
    return strip(a) == strip(b)
