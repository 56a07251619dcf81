"""One sequence being generated, as the engine core sees it: token ids only."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered: everything after PREEMPTED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


# Stands for a token sampled by a step that is still running on the device: the next step is
# scheduled before the token is known, and its input is taken from the device directly.
PLACEHOLDER_TOKEN = -1


class LogitsMask(Protocol):
    """Per-request hook that restricts the next token (structured output).

    `allowed_tokens` returns a bool tensor of shape [vocab_size] (True = allowed), the same
    packed as int32 [ceil(vocab_size / 32)] (bit t % 32 of word t // 32), or None for no
    restriction this step; `accept_token` advances the hook's state with the sampled token.
    An exception from either finishes only this request, with finish_reason "error".
    """

    def allowed_tokens(self, vocab_size: int) -> Any: ...

    def accept_token(self, token_id: int) -> None: ...


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: never None here
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower runs first under the priority policy
    parent_id: str | None = None  # set on the children of an n > 1 request
    index: int = 0  # which of the parent's n completions
    cache_salt: str | None = None  # requests with different salts never share cached blocks
    logits_mask: LogitsMask | None = None
    generator: Any = None  # torch.Generator for seeded sampling; opaque to the scheduler
    # Sibling whose prompt blocks this request waits for (n > 1), so they are computed once.
    share_prompt_with: Request | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit on first schedule; -1 until scheduled
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    error: str | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def group_id(self) -> str:
        return self.parent_id if self.parent_id is not None else self.request_id

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def set_output_token(self, index: int, token_id: int) -> None:
        """Fills in a token that was appended as PLACEHOLDER_TOKEN."""
        self.output_token_ids[index] = token_id
        self.all_token_ids[self.num_prompt_tokens + index] = token_id

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drops output tokens past the first `num_output_tokens` (placeholders of a step that
        ran after the request had in fact finished)."""
        del self.output_token_ids[num_output_tokens:]
        del self.all_token_ids[self.num_prompt_tokens + num_output_tokens:]
