"""Engine configuration: fixed at construction, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from worker.engine.errors import InvalidRequestError


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # tokens per step, prefill chunks included
    max_model_len: int | None = None  # None: the model's own context length
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    # KV-cache size: an explicit block count wins, then a byte budget, then a fraction of
    # device memory (CUDA) or a fixed default budget (CPU).
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 512 * 1024**2
    # "auto": the Triton kernels on CUDA (where the head size allows), plain torch elsewhere.
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    # Decode steps up to this batch size replay CUDA graphs (Triton backend on CUDA only);
    # 0 turns graphs off.
    cuda_graph_max_batch: int = 256
    # Schedule step N+1 while step N runs on the device. None: on for CUDA, off elsewhere (a CPU
    # runs the step on the host anyway, so there is nothing to overlap).
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidRequestError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_batched_tokens must be >= 1")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise InvalidRequestError(
                f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidRequestError("gpu_memory_utilization must be in (0, 1]")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise InvalidRequestError(
                f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.cuda_graph_max_batch < 0:
            raise InvalidRequestError("cuda_graph_max_batch must be >= 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InvalidRequestError("num_kv_blocks must be >= 1")
