"""Offline generation: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from worker.engine.config import EngineConfig
from worker.engine.engine import Engine
from worker.engine.errors import InvalidRequestError
from worker.engine.request import LogitsMask
from worker.engine.sampling_params import SamplingParams
from worker.models.registry import resolve_model
from worker.outputs import OutputProcessor, RequestOutput
from worker.tokenizer import Tokenizer

# A prompt is text, a list of token ids, or a dict with "prompt" or "prompt_token_ids".
Prompt = str | list[int] | dict[str, Any]

_ENGINE_FIELDS = set(EngineConfig.__dataclass_fields__)


class LLM:
    """A model and its engine, run in this process.

    `model` is "tiny" (the built-in model), a local Hugging Face model folder, or a hub id.
    Engine options (block_size, max_num_seqs, max_num_batched_tokens, max_model_len,
    enable_prefix_caching, enable_chunked_prefill, scheduling_policy, num_kv_blocks,
    kv_cache_memory_bytes, gpu_memory_utilization) are keyword arguments.
    """

    def __init__(self, model: str = "tiny", *, dtype: str = "auto", device: str = "auto",
                 load_format: str = "auto", seed: int = 0, **engine_options: Any) -> None:
        unknown = set(engine_options) - _ENGINE_FIELDS
        if unknown:
            raise TypeError(f"unknown engine options: {', '.join(sorted(unknown))}")
        self.model_dir = resolve_model(model)
        self.tokenizer = Tokenizer.load(self.model_dir) if _has_tokenizer(self.model_dir) else None
        self.engine = Engine(self.model_dir, EngineConfig(**engine_options), device=device,
                             dtype=dtype, load_format=load_format, seed=seed)
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 logits_masks: Sequence[LogitsMask | None] | None = None
                 ) -> list[RequestOutput]:
        """Runs prompts to completion; results come back in the order of the prompts.

        `logits_masks`: one per prompt (or None), e.g. `worker.structured` grammar matchers."""
        single = isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int))
        prompt_list: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item, arg-type]
        params_list = self._params_per_prompt(sampling_params, len(prompt_list))
        encoded = [self._encode(p) for p in prompt_list]
        return self._run(encoded, params_list, priority, use_tqdm, logits_masks)

    def chat(self, messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Generates replies to one conversation or a list of conversations."""
        tokenizer = self._require_tokenizer()
        conversations: list[Any] = (
            [messages] if messages and isinstance(messages[0], dict) else list(messages))
        params_list = self._params_per_prompt(sampling_params, len(conversations))
        encoded: list[tuple[str | None, list[int]]] = []
        for conv in conversations:
            ids = tokenizer.apply_chat_template(list(conv), add_generation_prompt=add_generation_prompt,
                                                chat_template=chat_template,
                                                **(chat_template_kwargs or {}))
            encoded.append((None, ids))
        return self._run(encoded, params_list, None, use_tqdm)

    def _run(self, encoded: list[tuple[str | None, list[int]]], params_list: list[SamplingParams],
             priority: Sequence[int] | None, use_tqdm: bool,
             logits_masks: Sequence[LogitsMask | None] | None = None) -> list[RequestOutput]:
        if priority is not None and len(priority) != len(encoded):
            raise InvalidRequestError("priority needs one value per prompt", param="priority")
        if logits_masks is not None and len(logits_masks) != len(encoded):
            raise InvalidRequestError("logits_masks needs one entry per prompt")
        processor = OutputProcessor(self.tokenizer)
        ids = []
        try:
            for i, ((text, token_ids), params) in enumerate(zip(encoded, params_list, strict=True)):
                rid = str(next(self._ids))
                self.engine.add_request(rid, token_ids, params,
                                        priority=priority[i] if priority is not None else 0,
                                        logits_mask=logits_masks[i] if logits_masks else None)
                processor.add_request(rid, text, token_ids, params)
                ids.append(rid)
        except Exception:
            self.engine.abort(ids)  # all or nothing: a bad prompt runs none of the batch
            raise
        pending = set(ids)
        with tqdm(total=len(ids), desc="generating", unit="prompt", disable=not use_tqdm) as bar:
            while pending:
                engine_outputs = self.engine.step()
                if not engine_outputs and not self.engine.has_unfinished_requests():
                    break
                _, stops = processor.process(engine_outputs)
                for rid, index, stop in stops:
                    self.engine.stop_completion(rid, index, stop)
                for rid in {eo.request_id for eo in engine_outputs}:
                    result = processor.get(rid)
                    if result is not None and result.finished and rid in pending:
                        pending.discard(rid)
                        bar.update()
        results = [processor.pop(rid) for rid in ids]
        return [r for r in results if r is not None]

    def _params_per_prompt(self, params: SamplingParams | Sequence[SamplingParams] | None,
                           n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise InvalidRequestError(f"got {len(params)} sampling params for {n} prompts")
        return params

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return prompt, self._require_tokenizer().encode(prompt)
        if isinstance(prompt, list):
            return None, list(prompt)
        raise InvalidRequestError(f"a prompt must be text or a list of token ids, got {type(prompt)}")

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InvalidRequestError(f"{self.model_dir} has no tokenizer: pass token ids")
        return self.tokenizer


def _has_tokenizer(model_dir: Any) -> bool:
    from pathlib import Path
    d = Path(model_dir)
    return (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()
