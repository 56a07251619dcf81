"""The worker's Tokenizer over the tiny model's files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from worker.engine.errors import InvalidRequestError, ModelLoadError
from worker.tokenizer import Tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
CHATML = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n"
          "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.load(tiny_model_dir)


def _tokenizer_copy(src: Path, dst: Path, **config_changes: object) -> Path:
    """A tokenizer-only folder with tokenizer_config.json edited (None values removed)."""
    dst.mkdir()
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("text", ["Hello, world!", "paged attention 🚀 日本語", " x ", ""])
def test_encode_decode_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids) == text


def test_no_bos_is_added_and_special_tokens_are_skipped_on_request(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tokenizer.decode(ids) == "user\nhi"


def test_eos_ids_come_from_tokenizer_and_generation_config(tokenizer: Tokenizer) -> None:
    assert tokenizer.eos_token_ids == frozenset({0, 2})


def test_eos_ids_without_generation_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = _tokenizer_copy(tiny_model_dir, tmp_path / "tok")
    assert Tokenizer.load(folder).eos_token_ids == frozenset({2})
    (folder / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert Tokenizer.load(folder).eos_token_ids == frozenset({2, 7})


def test_bad_generation_config_is_a_load_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = _tokenizer_copy(tiny_model_dir, tmp_path / "tok")
    (folder / "generation_config.json").write_text('{"eos_token_id": "two"}')
    with pytest.raises(ModelLoadError, match="eos_token_id"):
        Tokenizer.load(folder)
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"generation_config\.json"):
        Tokenizer.load(folder)


def test_vocabulary_and_special_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == len(tokenizer) == 2048
    assert sorted(tokenizer.all_special_ids) == [0, 1, 2]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>",
                                                          "<|im_end|>"]
    assert tokenizer.hf.eos_token == "<|im_end|>"


def test_chat_template_ids(tokenizer: Tokenizer) -> None:
    ids = tokenizer.apply_chat_template(MESSAGES)
    assert ids == tokenizer.encode(CHATML, add_special_tokens=False)
    assert ids.count(1) == 3 and ids.count(2) == 2
    assert tokenizer.decode(ids, skip_special_tokens=False) == CHATML
    no_prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert tokenizer.decode(no_prompt, skip_special_tokens=False) == CHATML.removesuffix(
        "<|im_start|>assistant\n")


def test_chat_template_override_and_extra_variables(tokenizer: Tokenizer) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}|{{ greeting }}]{% endfor %}"
    ids = tokenizer.apply_chat_template(MESSAGES, chat_template=template, greeting="hello")
    assert tokenizer.decode(ids) == "[system|hello][user|hello]"


def test_missing_chat_template_is_an_invalid_request(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = _tokenizer_copy(tiny_model_dir, tmp_path / "tok", chat_template=None)
    tok = Tokenizer.load(folder)
    with pytest.raises(InvalidRequestError, match="no chat template") as err:
        tok.apply_chat_template(MESSAGES)
    assert err.value.param == "messages"
    # A template given with the request still works.
    ids = tok.apply_chat_template(MESSAGES, chat_template="{{ messages[0]['content'] }}")
    assert tok.decode(ids) == "Be brief."


def test_template_errors_are_invalid_requests(tokenizer: Tokenizer) -> None:
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(InvalidRequestError, match="user first"):
        tokenizer.apply_chat_template(MESSAGES, chat_template=strict)
    with pytest.raises(InvalidRequestError, match="empty"):
        tokenizer.apply_chat_template([])


def test_loading_a_missing_or_broken_folder_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer"):
        Tokenizer.load(tmp_path / "broken")
