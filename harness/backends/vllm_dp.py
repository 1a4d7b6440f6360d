"""vLLM's own data parallelism for offline runs: ``--backend-arg data_parallel_size=N``.

vllm 0.32's offline ``LLM`` refuses ``data_parallel_size > 1`` in one process ("not supported for
single-process usage and may hang"). Its async engine client — what ``vllm serve
--data-parallel-size N`` runs — supports it: ``AsyncLLM`` starts N engine-core processes (each a
full replica, ``tensor_parallel_size`` devices each) behind vLLM's DP coordinator, which balances
requests over them. ``DataParallelLLM`` gives that client the few ``LLM`` methods the vLLM backend
calls (``generate``, ``get_tokenizer``, ``collective_rpc``, ``shutdown``), driving it on a private
event loop, so the backend code is the same for one engine or N.

Everything else is unchanged: each sample is its own request seeded by (seed, problem, sample
index), so which replica serves it does not change it; ``collective_rpc`` reaches every replica
(the AutoDeco head switch/swap); the AutoDeco trace processor writes one file per engine process.
Across nodes, vLLM's Ray DP backend places the replicas: ``--backend-arg data_parallel_backend=ray``
inside a running Ray cluster (README, "Running at scale").
"""

from __future__ import annotations

import asyncio
import itertools
import sys


class DataParallelLLM:
    """``AsyncLLM`` with ``data_parallel_size = N`` behind the synchronous ``LLM`` calls the backend uses."""

    def __init__(self, **engine_kwargs):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._loop = asyncio.new_event_loop()
        self._ids = itertools.count()

        async def start():  # the engine client binds to the loop it is created on
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs))

        try:
            self.engine = self._loop.run_until_complete(start())
        except BaseException:
            self._loop.close()
            raise
        self.replicas = len(getattr(self.engine.engine_core, "core_engines", ()))  # the client's engine cores
        print(f"autodeco vllm backend: data parallelism over {self.replicas} engine replicas", file=sys.stderr)

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    def generate(self, prompts: list, params: list, use_tqdm: bool = False) -> list:
        """Final ``RequestOutput`` per prompt, in the order given (all requests in flight at once)."""
        from vllm.sampling_params import RequestOutputKind

        async def one(prompt, sampling):
            sampling.output_kind = RequestOutputKind.FINAL_ONLY
            final = None
            async for output in self.engine.generate(prompt, sampling, request_id=f"autodeco-{next(self._ids)}"):
                final = output
            return final

        async def every():
            return await asyncio.gather(*(one(p, s) for p, s in zip(prompts, params, strict=True)))

        return self._loop.run_until_complete(every())

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list:
        """Call ``method`` on the workers of every replica."""
        return self._loop.run_until_complete(self.engine.collective_rpc(method, args=args, kwargs=kwargs))

    def shutdown(self) -> None:
        if self._loop.is_closed():
            return
        self.engine.shutdown()
        pending = asyncio.all_tasks(self._loop)  # the client's output and stats tasks
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()
