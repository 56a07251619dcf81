"""Benchmark datasets, made locally: what each request sends and how long its reply must be.

Every dataset yields `SampleRequest`s (a prompt as text or token ids, its length in tokens, the
output length to ask for), from a seed, with no download. The same objects drive the serving
benchmark (`loadtest.serve`) and the offline engine benchmark (`loadtest.offline`).

  random             random token ids decoded to text, lengths fixed or in a range (vLLM's
                     `random`: --random-input-len, --random-output-len, --random-range-ratio,
                     --random-prefix-len); the text is re-encoded and adjusted to the target length
  token-ids          the same lengths, sent as token ids (no text; /v1/completions only)
  sharegpt-synthetic heavy-tailed (log-normal) lengths whose means after vLLM's ShareGPT length
                     filter are about 202 in / 179 out, text cut from the project's bundled corpus
  sharegpt           a user's JSON or JSONL file in the ShareGPT layout (--dataset-path)
  prefix_repetition  a few shared prefixes, each request one of them plus its own suffix, for
                     prefix caching (vLLM's name and flags: --prefix-repetition-*)

Imports only numpy, the standard library and (lazily) the worker's tokenizer, so the offline
benchmark can use it on a GPU box that has nothing else installed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

DATASET_NAMES = ("random", "token-ids", "sharegpt-synthetic", "sharegpt", "prefix_repetition")
# vLLM's ShareGPT filter (benchmarks/datasets.py is_valid_sequence): drop pairs with fewer than
# 4 tokens on either side, a prompt over 1024 tokens, or over 2048 tokens in all.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048
# Log-normal lengths (median, sigma) fitted so that the means after the filter above are
# 202 prompt and 179 output tokens, as in the ShareGPT set vLLM's benchmarks use.
SYNTHETIC_INPUT_MEDIAN, SYNTHETIC_INPUT_SIGMA = 140.27, 1.1
SYNTHETIC_OUTPUT_MEDIAN, SYNTHETIC_OUTPUT_SIGMA = 112.81, 1.0
CORPUS_PATH = Path(__file__).resolve().parents[1] / "worker" / "models" / "data" / "tiny_corpus.txt"
# Re-encoding decoded ids rarely gives back the same count; a few corrections always settle it.
MAX_LENGTH_FIXES = 10


class DatasetError(ValueError):
    """A dataset cannot be built from the given options (bad file, impossible lengths)."""


class TextTokenizer(Protocol):
    """What datasets need of a tokenizer (worker.tokenizer.Tokenizer has it)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def all_special_ids(self) -> list[int]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class SampleRequest:
    """One request of a workload. `prompt` is text, or token ids for /v1/completions."""

    prompt: str | list[int]
    prompt_len: int
    expected_output_len: int


@dataclass
class DatasetConfig:
    """Every dataset option, named as `vllm bench serve` names its flags."""

    dataset_name: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 1000
    seed: int = 0
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_prefix_len: int = 0
    sharegpt_output_len: int | None = None
    prefix_repetition_prefix_len: int = 256
    prefix_repetition_suffix_len: int = 256
    prefix_repetition_num_prefixes: int = 10
    prefix_repetition_output_len: int = 128


@dataclass
class VocabOnly:
    """A tokenizer stand-in for the token-ids dataset where the model ships no tokenizer (a
    shipped config run with dummy weights): ids from [16, vocab_size), the lowest left out as
    most vocabularies keep special tokens there."""

    vocab_size: int

    @property
    def all_special_ids(self) -> list[int]:
        return list(range(16))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise DatasetError("this dataset needs a tokenizer; the model has none (--tokenizer)")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raise DatasetError("this dataset needs a tokenizer; the model has none (--tokenizer)")


def load_tokenizer(name: str) -> TextTokenizer:
    """'tiny' or a local model folder through the worker's tokenizer; anything else (a hub id)
    through transformers, which may download the tokenizer's files."""
    from worker.tokenizer import Tokenizer

    if name == "tiny" or Path(name).expanduser().is_dir():
        from worker.models.registry import resolve_model

        return Tokenizer.load(resolve_model(name))
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(name))


def sample_requests(cfg: DatasetConfig, tokenizer: TextTokenizer) -> list[SampleRequest]:
    """The workload `cfg` describes, the same for the same seed and tokenizer."""
    if cfg.num_prompts < 1:
        raise DatasetError(f"num_prompts must be >= 1, got {cfg.num_prompts}")
    rng = np.random.default_rng(cfg.seed)
    name = cfg.dataset_name
    if name == "random":
        return _random(cfg, tokenizer, rng, as_ids=False)
    if name == "token-ids":
        return _random(cfg, tokenizer, rng, as_ids=True)
    if name == "sharegpt-synthetic":
        return _sharegpt_synthetic(cfg, tokenizer, rng)
    if name == "sharegpt":
        return _sharegpt_file(cfg, tokenizer, rng)
    if name == "prefix_repetition":
        return _prefix_repetition(cfg, tokenizer, rng)
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def describe(samples: list[SampleRequest]) -> dict[str, Any]:
    """Sizes of a workload, for reports."""
    ins = [s.prompt_len for s in samples]
    outs = [s.expected_output_len for s in samples]
    return {"num_requests": len(samples), "total_input_tokens": sum(ins),
            "total_output_tokens": sum(outs), "mean_input_len": sum(ins) / len(ins),
            "mean_output_len": sum(outs) / len(outs), "input_len_min_max": [min(ins), max(ins)],
            "output_len_min_max": [min(outs), max(outs)]}


def is_valid_sequence(prompt_len: int, output_len: int, skip_min_output_len_check: bool = False
                      ) -> bool:
    """vLLM's ShareGPT length filter."""
    return not (prompt_len < SHAREGPT_MIN_LEN
                or (not skip_min_output_len_check and output_len < SHAREGPT_MIN_LEN)
                or prompt_len > SHAREGPT_MAX_PROMPT_LEN
                or prompt_len + output_len > SHAREGPT_MAX_TOTAL_LEN)


def range_lengths(mean: int, ratio: float, n: int, rng: np.random.Generator) -> list[int]:
    """n lengths uniform in [mean * (1 - r), mean * (1 + r)], at least 1 (vLLM's rule)."""
    if not 0.0 <= ratio < 1.0:
        raise DatasetError(f"random_range_ratio must be in [0, 1), got {ratio}")
    lo, hi = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


class _TextMaker:
    """Text of an exact token count from token ids: decode, re-encode, correct, repeat."""

    def __init__(self, tokenizer: TextTokenizer, rng: np.random.Generator, text: bool = True
                 ) -> None:
        self.tok = tokenizer
        self.rng = rng
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(tokenizer.vocab_size) if i not in special]
        if text:
            # Tokens that are part of a UTF-8 character decode to U+FFFD alone, which re-encodes
            # as other tokens: leaving them out is what lets a decoded prompt keep its length.
            ids = [i for i in ids if "\ufffd" not in tokenizer.decode([i])]
        self.ids = np.array(ids)

    def random_ids(self, n: int) -> list[int]:
        return [int(i) for i in self.rng.choice(self.ids, size=n)]

    def text(self, ids: list[int], target: int) -> tuple[str, int]:
        """Text whose encoding is `target` tokens when it can be made so; and its actual count."""
        text = self.tok.decode(ids)
        for _ in range(MAX_LENGTH_FIXES):
            got = self.tok.encode(text, add_special_tokens=False)
            if len(got) == target:
                return text, target
            # Too long: keep the first `target` of the re-encoded ids; too short: add random ids.
            fixed = got[:target] if len(got) > target else got + self.random_ids(target - len(got))
            text = self.tok.decode(fixed)
        return text, len(self.tok.encode(text, add_special_tokens=False))


def _random(cfg: DatasetConfig, tok: TextTokenizer, rng: np.random.Generator, as_ids: bool
            ) -> list[SampleRequest]:
    if cfg.random_input_len < 1 or cfg.random_output_len < 1:
        raise DatasetError("random_input_len and random_output_len must be >= 1")
    maker = _TextMaker(tok, rng, text=not as_ids)
    in_lens = range_lengths(cfg.random_input_len, cfg.random_range_ratio, cfg.num_prompts, rng)
    out_lens = range_lengths(cfg.random_output_len, cfg.random_range_ratio, cfg.num_prompts, rng)
    prefix = maker.random_ids(cfg.random_prefix_len)
    out = []
    for n_in, n_out in zip(in_lens, out_lens, strict=True):
        ids = prefix + maker.random_ids(n_in)
        if as_ids:
            out.append(SampleRequest(ids, len(ids), n_out))
        else:
            text, n = maker.text(ids, len(ids))
            out.append(SampleRequest(text, n, n_out))
    return out


def _corpus_ids(tok: TextTokenizer) -> list[int]:
    try:
        text = CORPUS_PATH.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"cannot read the bundled corpus {CORPUS_PATH}: {exc}") from exc
    # Paragraph by paragraph: one encode of the whole file would trip tokenizers' warning about
    # sequences longer than the model's context.
    return [i for para in text.split("\n\n") if para.strip()
            for i in tok.encode(para + "\n\n", add_special_tokens=False)]


def _sharegpt_synthetic(cfg: DatasetConfig, tok: TextTokenizer, rng: np.random.Generator
                        ) -> list[SampleRequest]:
    maker = _TextMaker(tok, rng)
    corpus = _corpus_ids(tok)
    out: list[SampleRequest] = []
    while len(out) < cfg.num_prompts:
        n_in = max(1, int(rng.lognormal(math.log(SYNTHETIC_INPUT_MEDIAN), SYNTHETIC_INPUT_SIGMA)))
        n_out = max(1, int(rng.lognormal(math.log(SYNTHETIC_OUTPUT_MEDIAN),
                                         SYNTHETIC_OUTPUT_SIGMA)))
        if cfg.sharegpt_output_len is not None:
            n_out = cfg.sharegpt_output_len
        if not is_valid_sequence(n_in, n_out, cfg.sharegpt_output_len is not None):
            continue
        # A window of real text at a random place, wrapping around the corpus's end.
        start = int(rng.integers(len(corpus)))
        ids = [corpus[(start + k) % len(corpus)] for k in range(n_in)]
        text, n = maker.text(ids, n_in)
        out.append(SampleRequest(text, n, n_out))
    return out


def _sharegpt_file(cfg: DatasetConfig, tok: TextTokenizer, rng: np.random.Generator
                   ) -> list[SampleRequest]:
    if not cfg.dataset_path:
        raise DatasetError("the sharegpt dataset reads --dataset-path (a JSON list or JSONL of "
                           "{\"conversations\": [{\"from\": \"human\", \"value\": ...}, ...]}); "
                           "use sharegpt-synthetic for one made locally")
    entries = read_sharegpt(cfg.dataset_path)
    order = rng.permutation(len(entries))
    out: list[SampleRequest] = []
    for i in order:
        prompt, completion = entries[i]
        n_in = len(tok.encode(prompt, add_special_tokens=False))
        n_out = (cfg.sharegpt_output_len if cfg.sharegpt_output_len is not None
                 else len(tok.encode(completion, add_special_tokens=False)))
        if is_valid_sequence(n_in, n_out, cfg.sharegpt_output_len is not None):
            out.append(SampleRequest(prompt, n_in, n_out))
            if len(out) == cfg.num_prompts:
                return out
    if not out:
        raise DatasetError(f"{cfg.dataset_path}: no conversation passes the length filter "
                           f"(prompt {SHAREGPT_MIN_LEN}..{SHAREGPT_MAX_PROMPT_LEN} tokens, "
                           f"output >= {SHAREGPT_MIN_LEN}, total <= {SHAREGPT_MAX_TOTAL_LEN})")
    # Fewer usable conversations than prompts asked for: cycle through them, as vLLM oversamples.
    return [out[k % len(out)] for k in range(cfg.num_prompts)]


def read_sharegpt(path: str) -> list[tuple[str, str]]:
    """(first turn, second turn) of every conversation with two turns or more in a ShareGPT file."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    try:
        stripped = raw.lstrip()
        rows = (json.loads(raw) if stripped.startswith("[")
                else [json.loads(line) for line in raw.splitlines() if line.strip()])
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is neither a JSON list nor JSON lines: {exc}") from exc
    pairs = []
    for row in rows:
        turns = row.get("conversations") if isinstance(row, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(
                isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
            pairs.append((turns[0]["value"], turns[1]["value"]))
    if not pairs:
        raise DatasetError(f"{path} holds no conversation in the ShareGPT layout "
                           "({\"conversations\": [{\"from\": ..., \"value\": ...}, x2]})")
    return pairs


def _prefix_repetition(cfg: DatasetConfig, tok: TextTokenizer, rng: np.random.Generator
                       ) -> list[SampleRequest]:
    if cfg.prefix_repetition_num_prefixes < 1:
        raise DatasetError("prefix_repetition_num_prefixes must be >= 1")
    maker = _TextMaker(tok, rng)
    prefixes = [maker.text(maker.random_ids(cfg.prefix_repetition_prefix_len),
                           cfg.prefix_repetition_prefix_len)[0]
                for _ in range(cfg.prefix_repetition_num_prefixes)]
    out = []
    for k in range(cfg.num_prompts):
        suffix, _ = maker.text(maker.random_ids(cfg.prefix_repetition_suffix_len),
                               cfg.prefix_repetition_suffix_len)
        text = prefixes[k % len(prefixes)] + suffix
        out.append(SampleRequest(text, len(tok.encode(text, add_special_tokens=False)),
                                 cfg.prefix_repetition_output_len))
    # Shuffled, so requests that share a prefix do not arrive back to back.
    return [out[i] for i in rng.permutation(len(out))]


def add_dataset_arguments(p: Any, default: str | None, with_lengths: bool = True) -> None:
    """The dataset flags, named as `vllm bench serve` names them, on an argparse parser or
    group. with_lengths=False leaves out --random-input-len/-output-len/-range-ratio for a
    command that has its own length flags (loadtest.offline's --input-len ...)."""
    p.add_argument("--dataset-name", choices=DATASET_NAMES, default=default,
                   help="random: random token ids as text; token-ids: the same sent as ids; "
                        "sharegpt-synthetic: heavy-tailed lengths (means ~202 in / 179 out); "
                        "sharegpt: your file (--dataset-path); prefix_repetition: shared "
                        "prefixes, for prefix caching")
    p.add_argument("--dataset-path", help="sharegpt: a JSON list or JSONL in the ShareGPT layout")
    if with_lengths:
        p.add_argument("--random-input-len", type=int, default=1024,
                       help="random, token-ids: prompt tokens (default 1024)")
        p.add_argument("--random-output-len", type=int, default=128,
                       help="random, token-ids: tokens to generate (default 128)")
        p.add_argument("--random-range-ratio", type=float, default=0.0,
                       help="lengths uniform in [len*(1-r), len*(1+r)]")
    p.add_argument("--random-prefix-len", type=int, default=0,
                   help="random tokens shared by every prompt, before its own")
    p.add_argument("--sharegpt-output-len", type=int,
                   help="sharegpt datasets: this output length for every request")
    p.add_argument("--prefix-repetition-prefix-len", type=int, default=256,
                   help="prefix_repetition: tokens of each shared prefix (default 256)")
    p.add_argument("--prefix-repetition-suffix-len", type=int, default=256,
                   help="prefix_repetition: tokens of each request's own suffix (default 256)")
    p.add_argument("--prefix-repetition-num-prefixes", type=int, default=10,
                   help="prefix_repetition: distinct prefixes the requests share (default 10)")
    p.add_argument("--prefix-repetition-output-len", type=int, default=128,
                   help="prefix_repetition: tokens to generate (default 128)")


def config_from_args(args: Any, **overrides: Any) -> DatasetConfig:
    """A DatasetConfig from parsed flags that share its field names; `overrides` win."""
    fields = {k: getattr(args, k) for k in DatasetConfig.__dataclass_fields__ if hasattr(args, k)}
    return DatasetConfig(**{**fields, **overrides})
