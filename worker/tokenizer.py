"""The model's tokenizer, as the worker uses it: text in, token ids out, and back."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from worker.engine.errors import InvalidRequestError, ModelLoadError


class Tokenizer:
    """Wraps a Hugging Face fast tokenizer; `.hf` is the wrapped object."""

    def __init__(self, hf: Any, eos_token_ids: Iterable[int] = ()) -> None:
        self.hf = hf
        eos = set(eos_token_ids)
        if hf.eos_token_id is not None:
            eos.add(int(hf.eos_token_id))
        self._eos_token_ids = frozenset(eos)
        # len() walks the vocabulary and added tokens; the answer never changes.
        self._vocab_size = len(hf)
        # Decoding runs once per token per request: go straight to the Rust tokenizer when the
        # wrapper would add nothing (its only extra step is the optional space clean-up).
        backend = getattr(hf, "backend_tokenizer", None)
        self._backend = None if getattr(hf, "clean_up_tokenization_spaces", False) else backend

    @classmethod
    def load(cls, model_dir: str | Path) -> Tokenizer:
        folder = Path(model_dir)
        if not folder.is_dir():
            raise ModelLoadError(f"tokenizer folder {folder} does not exist")
        try:
            if (folder / "tokenizer.json").is_file():
                # AutoTokenizer may pick a model-specific class that rebuilds the pre-tokenizer
                # from its own defaults, giving ids the model was not trained on.
                hf = PreTrainedTokenizerFast.from_pretrained(folder)
            else:
                hf = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
            raise ModelLoadError(f"cannot load the tokenizer from {folder}: {exc}") from exc
        return cls(hf, _generation_eos_ids(folder))

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (may be below the model's embedding rows)."""
        return self._vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.hf.all_special_ids)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, *,
               spaces_between_special_tokens: bool | None = None) -> str:
        """Decode ids to text.

        `spaces_between_special_tokens` reaches tokenizers that support it (slow, SentencePiece
        ones); fast tokenizers have no such option and ignore it. None keeps the default.
        """
        if self._backend is not None:
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        kwargs: dict[str, Any] = {}
        if spaces_between_special_tokens is not None:
            kwargs["spaces_between_special_tokens"] = spaces_between_special_tokens
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens, **kwargs)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(list(ids)))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **template_kwargs: Any) -> list[int]:
        """Render the conversation with the chat template and return its token ids."""
        if chat_template is None and not self.chat_template:
            raise InvalidRequestError(
                "this model has no chat template; send a plain completion request or pass a "
                "chat_template", param="messages")
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        try:
            text = self.hf.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt,
                chat_template=chat_template, tokenize=False, **template_kwargs)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as exc:
            # The template's own checks (raise_exception) and messages it cannot render both
            # land here: the caller's input is at fault, not the model.
            raise InvalidRequestError(f"cannot apply the chat template: {exc}",
                                      param="messages") from exc
        # The template already wrote every special token the model expects.
        return self.encode(text, add_special_tokens=False)

    def __len__(self) -> int:
        return self._vocab_size


def _generation_eos_ids(folder: Path) -> list[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ModelLoadError(f"{path}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return ids
