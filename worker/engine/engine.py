"""The engine core: requests in, token ids out, one `step()` at a time.

A step is `scheduler.schedule()` (plain data), `runner.launch(...)`, then
`scheduler.advance(...)` and, once the step's tokens are on the host, `scheduler.resolve(...)`. Everything a caller can get wrong is checked in `add_request`, so a step
never fails because of one request's input.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.engine.block_manager import KVCacheManager
from worker.engine.config import EngineConfig
from worker.engine.errors import (
    DuplicateRequestError,
    InvalidRequestError,
    ModelLoadError,
    PromptTooLongError,
)
from worker.engine.request import LogitsMask, Request, RequestStatus
from worker.engine.runner import ModelRunner, PendingStep
from worker.engine.sampler import TokenLogprobs, has_penalty
from worker.engine.sampling_params import SamplingParams
from worker.engine.scheduler import Scheduler, SchedulerOutput
from worker.models.config import ModelConfig
from worker.models.loader import load_model, resolve_dtype

log = logging.getLogger(__name__)

# Room kept on a GPU for activations, logits and the allocator's slack, on top of an estimate
# from the step size.
_GPU_RESERVE_BYTES = 1 << 30


@dataclass
class EngineOutput:
    """What one completion gained in one step."""

    request_id: str  # the id given to add_request
    index: int  # which of its n completions
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _triton_unsupported(device: torch.device, cfg: ModelConfig) -> str | None:
    """Why the Triton kernels cannot serve this model on this device, or None if they can."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"device {device} is not a GPU (set TRITON_INTERPRET=1 to interpret on the CPU)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if cfg.head_dim < 16 or cfg.head_dim & (cfg.head_dim - 1):
        return f"head_dim {cfg.head_dim} is not a power of two >= 16"
    return None


class Engine:
    def __init__(self, model_dir: str | Path | None, config: EngineConfig | None = None, *,
                 model_config: ModelConfig | None = None, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", load_format: str = "auto",
                 seed: int = 0) -> None:
        self.config = config or EngineConfig()
        if model_config is None:
            if model_dir is None:
                raise ModelLoadError("give a model directory or a model config")
            model_config = ModelConfig.from_dir(model_dir)
        self.model_config = model_config
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, model_config, self.device)
        torch.manual_seed(seed)
        self.attention_backend = self._choose_backend()
        use_triton = self.attention_backend == "triton"
        t0 = time.perf_counter()
        model = load_model(model_dir, model_config, self.device, self.dtype, load_format, seed,
                           use_triton=use_triton)
        log.info("loaded %s (%.1fM params, %s, %s, %s attention) in %.1f s",
                 model_config.architecture, model_config.num_params / 1e6, self.dtype,
                 self.device, self.attention_backend, time.perf_counter() - t0)
        num_blocks = self._num_kv_blocks()
        self.max_model_len = self._max_model_len(num_blocks)
        self.kv = KVCacheManager(num_blocks, self.config.block_size,
                                 self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.kv, self.max_model_len)
        graphs = use_triton and self.device.type == "cuda"
        self.runner = ModelRunner(
            model, num_blocks, self.config.block_size, self.device, self.dtype,
            max_model_len=self.max_model_len, max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            cuda_graph_max_batch=self.config.cuda_graph_max_batch if graphs else 0,
            head_major_kv=use_triton)
        log.info("KV cache: %d blocks of %d tokens (%d tokens); max_model_len %d", num_blocks,
                 self.config.block_size, num_blocks * self.config.block_size, self.max_model_len)
        self._children: dict[str, list[Request]] = {}
        # On by default where it pays: a CUDA device runs a step while the host plans the next.
        self.async_scheduling = (self.device.type == "cuda" if self.config.async_scheduling is None
                                 else self.config.async_scheduling)
        self._in_flight: tuple[SchedulerOutput, PendingStep] | None = None

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.model_config.eos_token_ids)

    def _choose_backend(self) -> str:
        choice = self.config.attention_backend
        if choice == "torch" or (choice == "auto" and self.device.type != "cuda"):
            return "torch"
        why_not = _triton_unsupported(self.device, self.model_config)
        if why_not is None:
            return "triton"
        if choice == "triton":
            raise ModelLoadError(f"the Triton attention backend cannot run here: {why_not}")
        return "torch"

    def _kv_bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.model_config.kv_bytes_per_token(elem) * self.config.block_size

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if cfg.kv_cache_memory_bytes is not None:
            budget = cfg.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            m = self.model_config
            elem = torch.empty((), dtype=self.dtype).element_size()
            step = cfg.max_num_batched_tokens * (
                4 * m.hidden_size + 2 * m.intermediate_size + m.q_size + 2 * m.kv_size) * elem
            logits = cfg.max_num_seqs * m.vocab_size * 4 * 4
            budget = int(total * cfg.gpu_memory_utilization) - (total - free) - step - logits \
                - _GPU_RESERVE_BYTES
        else:
            budget = cfg.cpu_kv_cache_bytes
        num_blocks = budget // self._kv_bytes_per_block()
        if num_blocks < 1:
            raise ModelLoadError(
                f"no memory left for the KV cache (budget {budget / 2**20:.0f} MiB); lower "
                "max_num_batched_tokens or max_num_seqs, or raise the memory budget")
        return int(num_blocks)

    def _max_model_len(self, num_blocks: int) -> int:
        m = self.model_config
        limit = m.max_position_embeddings
        if self.config.max_model_len is not None:
            if self.config.max_model_len > limit:
                raise ModelLoadError(f"max_model_len {self.config.max_model_len} exceeds the "
                                     f"model's {limit} positions")
            limit = self.config.max_model_len
        if m.sliding_window is not None and m.sliding_window < limit:
            log.warning("sliding-window attention is not implemented: capping the context at "
                        "the window, %d tokens", m.sliding_window)
            limit = m.sliding_window
        capacity = num_blocks * self.config.block_size
        if capacity < limit:
            log.warning("KV cache holds %d tokens: capping max_model_len %d to it", capacity, limit)
            limit = capacity
        return limit

    # -- requests --------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None, *, priority: int = 0,
                    arrival_time: float | None = None, logits_mask: LogitsMask | None = None,
                    cache_salt: str | None = None) -> None:
        """Queues a request; raises an `InvalidRequestError` subclass if it cannot run."""
        params = params or SamplingParams()
        max_tokens = self._validate(request_id, prompt_token_ids, params, priority)
        if params.n > 1 and logits_mask is not None:
            raise InvalidRequestError("a logits mask holds per-sequence state: use n=1", param="n")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children: list[Request] = []
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            generator = None
            if seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(seed)
            child = Request(
                request_id=request_id if params.n == 1 else f"{index}_{request_id}",
                prompt_token_ids=list(prompt_token_ids),
                sampling_params=params,
                max_tokens=max_tokens,
                eos_token_ids=self.eos_token_ids,
                arrival_time=arrival,
                priority=priority,
                parent_id=None if params.n == 1 else request_id,
                index=index,
                cache_salt=cache_salt,
                logits_mask=logits_mask if index == 0 else None,
                generator=generator,
                share_prompt_with=children[0] if children else None,
            )
            children.append(child)
        self._children[request_id] = children
        for child in children:
            self.scheduler.add_request(child)

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams,
                  priority: int) -> int:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string", param="request_id")
        if request_id in self._children:
            raise DuplicateRequestError(f"request {request_id!r} is already running",
                                        param="request_id")
        if not isinstance(priority, int):
            raise InvalidRequestError("priority must be an integer", param="priority")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be SamplingParams")
        if not prompt:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        vocab = self.vocab_size
        for t in prompt:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise InvalidRequestError(
                    f"prompt token id {t!r} is outside the vocabulary [0, {vocab})", param="prompt")
        params.check_vocab(vocab)
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise PromptTooLongError(
                f"the prompt has {len(prompt)} tokens; this model's context is "
                f"{self.max_model_len} tokens and at least one must be left to generate",
                param="prompt")
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise PromptTooLongError(
                f"this model's context is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt)} and max_tokens asks for {params.max_tokens} more "
                f"({len(prompt) + params.max_tokens} in all)", param="max_tokens")
        return params.max_tokens

    def abort(self, request_ids: list[str] | str) -> list[EngineOutput]:
        """Ends requests (all their completions) at once and frees their blocks."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outputs = []
        for rid in request_ids:
            for child in self._children.pop(rid, []):
                if not child.is_finished:
                    self.scheduler.finish(child, RequestStatus.FINISHED_ABORTED)
                    outputs.append(self._output(child, [], []))
        return outputs

    def stop_completion(self, request_id: str, index: int, stop_reason: str) -> None:
        """Ends one completion that the caller found finished, e.g. on a stop string."""
        children = self._children.get(request_id, [])
        if index < len(children) and not children[index].is_finished:
            child = children[index]
            child.stop_reason = stop_reason
            self.scheduler.finish(child, RequestStatus.FINISHED_STOPPED)
            self._forget_if_done(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # -- the step --------------------------------------------------------------------------

    def step(self) -> list[EngineOutput]:
        """Runs the engine one step on; returns what requests gained in the step that finished.

        With async scheduling the next step is scheduled and queued on the device before the
        previous one's tokens are read back, so the host's work overlaps the device's instead of
        leaving it idle. A row whose sampling needs its last token on the host (a logits mask,
        penalties) still has its forward pass queued first: only the sampling waits, behind the
        previous step's tokens, so the host advances the grammars and builds the masks while
        the device runs the forward pass.
        """
        if not self.async_scheduling:
            sched = self.scheduler.schedule()
            if sched.is_empty:
                return []
            pending = self.runner.launch(sched)
            self.scheduler.advance(sched)
            return self._resolve(sched, pending)
        outputs: list[EngineOutput] = []
        prev, self._in_flight = self._in_flight, None
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return self._resolve(*prev) if prev is not None else []
        defer = prev is not None and self._needs_host_tokens(sched)
        pending = self.runner.launch(sched, prev[1] if prev is not None else None,
                                     sample=not defer)
        if defer:
            assert prev is not None
            # Before `advance`, as in a step that samples at once: the sampler sees the
            # outputs up to the previous step's token and no placeholder of this one.
            outputs += self._resolve(*prev)
            prev = None
            self.runner.sample(pending)
        self.scheduler.advance(sched)
        self._in_flight = (sched, pending)
        if prev is not None:
            outputs += self._resolve(*prev)
        return outputs

    @staticmethod
    def _needs_host_tokens(sched: SchedulerOutput) -> bool:
        return any(s.samples and (s.request.logits_mask is not None
                                  or has_penalty(s.request.sampling_params))
                   for s in sched.scheduled)

    def _resolve(self, sched: SchedulerOutput, pending: PendingStep) -> list[EngineOutput]:
        """Reads a launched step's tokens back and applies them to its requests."""
        result = pending.result()
        # Ended while the step ran (aborted, or finished by the step before): nothing to report.
        ended = {id(s.request) for s in sched.scheduled if s.request.is_finished}
        errors = dict(result.errors)
        for rid, token_id in result.sampled.items():
            req = self.scheduler.requests.get(rid)
            if req is not None and req.logits_mask is not None:
                try:
                    req.logits_mask.accept_token(token_id)
                except Exception as e:  # one request's hook must not end the batch
                    errors[rid] = f"{type(e).__name__}: {e}"
        self.scheduler.resolve(sched, result.sampled, errors)
        outputs = []
        for s in sched.scheduled:
            req = s.request
            rid = req.request_id
            if id(req) in ended:
                continue
            if rid in result.sampled or req.is_finished:
                new = [result.sampled[rid]] if rid in result.sampled and rid not in errors else []
                lps = [result.logprobs[rid]] if rid in result.logprobs and new else []
                outputs.append(self._output(req, new, lps))
                if req.is_finished:
                    self._forget_if_done(req.group_id)
        return outputs

    def _output(self, req: Request, new: list[int], lps: list[TokenLogprobs]) -> EngineOutput:
        return EngineOutput(
            request_id=req.group_id, index=req.index, new_token_ids=new, new_logprobs=lps,
            finish_reason=req.status.finish_reason, stop_reason=req.stop_reason, error=req.error,
            num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=max(req.num_cached_tokens, 0))

    def _forget_if_done(self, request_id: str) -> None:
        children = self._children.get(request_id)
        if children is not None and all(c.is_finished for c in children):
            del self._children[request_id]

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.pool.num_blocks,
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
        )
