"""A backend with a tokenizer and no engine, for runs whose samples are all in the store already.

`autodeco gather` replays a sharded command on the merged sample stores with it: the runner
plans the prompts with the model's tokenizer (so every stored sample's ``prompt_hash`` is checked
against them), finds nothing to generate, and grades and writes the results as the unsharded run
would. Asked to generate, it names what is missing instead. Not in ``BACKENDS``: nobody picks it
with ``--backend``.
"""

from __future__ import annotations

from collections.abc import Iterator

from transformers import AutoTokenizer

from harness.backends.base import Backend, BackendError, Completion, Request, same_base_and_heads
from harness.backends.hf import _load_tokenizer
from harness.models import is_autodeco, read_config


class StoredBackend(Backend):
    name = "stored"

    def __init__(self, model: str, **_engine_options):
        self.model_path = str(model)
        config = read_config(self.model_path)
        self.is_autodeco = is_autodeco(config)
        self.tokenizer = _load_tokenizer(AutoTokenizer, self.model_path, config)

    def generate(self, requests: list[Request]) -> Iterator[Completion]:
        first = requests[0]
        count = sum(len(r.indices) for r in requests)
        raise BackendError(
            f"{count} samples of {self.model_path} are in none of the gathered stores (first: {first.key} "
            f"seed {first.seed} sample {first.indices[0]}, decoding {first.preset.key}); run the shard that "
            f"owns them again (it resumes), then gather")

    def load_heads(self, model_path: str) -> bool:
        """Another checkpoint of the same base and heads: the tokenizer stays, nothing else is loaded."""
        if not same_base_and_heads(self.model_path, model_path):
            return False
        self.model_path = str(model_path)
        return True
