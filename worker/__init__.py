"""The GPU worker: engine, models, tokenizer, and (with the service) its Redis front.

`from worker import LLM, SamplingParams` is the offline API. Imports are lazy so that light
processes importing `worker.*` submodules do not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.engine.sampling_params import SamplingParams
    from worker.llm import LLM
    from worker.outputs import CompletionOutput, RequestOutput

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from worker.llm import LLM
        return LLM
    if name == "SamplingParams":
        from worker.engine.sampling_params import SamplingParams
        return SamplingParams
    if name in ("CompletionOutput", "RequestOutput"):
        from worker import outputs
        return getattr(outputs, name)
    raise AttributeError(name)
