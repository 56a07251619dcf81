"""The built-in tiny model: deterministic, loadable by Hugging Face, resolvable by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from worker.engine.errors import ModelLoadError
from worker.models import registry, tiny
from worker.models.registry import resolve_model
from worker.models.tiny import build_tiny_model

EXPECTED_FILES = {"config.json", "generation_config.json", "model.safetensors",
                  "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"}


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_two_builds_are_byte_identical(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    first, second = _contents(tiny_model_dir), _contents(again)
    assert set(first) == EXPECTED_FILES
    assert first == second


def test_build_leaves_no_temp_folder_and_keeps_a_finished_one(tmp_path: Path) -> None:
    target = tmp_path / "m"
    build_tiny_model(target)
    before = _contents(target)
    # A second builder losing the race to the rename must keep the winner's folder.
    assert build_tiny_model(target) == target
    assert _contents(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_build_refuses_a_non_model_folder(tmp_path: Path) -> None:
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="not an empty folder"):
        build_tiny_model(target)
    assert [p.name for p in tmp_path.iterdir()] == ["occupied"]


def test_size_is_a_few_megabytes(tiny_model_dir: Path) -> None:
    total = sum(p.stat().st_size for p in tiny_model_dir.iterdir())
    assert 1_000_000 < total < 8 * 1024 * 1024


def test_config_and_generation_config(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 2048
    assert (config["hidden_size"], config["intermediate_size"], config["head_dim"]) == (128, 384, 32)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["bos_token_id"] is None and config["eos_token_id"] == 2
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert generation == {"eos_token_id": [2, 0], "pad_token_id": 0}


def test_weights_are_bfloat16_with_hf_names_and_expected_statistics(tiny_model_dir: Path) -> None:
    with safe_open(tiny_model_dir / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
        assert names == set(tiny.weight_shapes())
        for name, shape in tiny.weight_shapes().items():
            tensor = f.get_tensor(name)
            assert tensor.dtype == torch.bfloat16 and tuple(tensor.shape) == shape
        assert torch.equal(f.get_tensor("model.norm.weight"), torch.ones(128, dtype=torch.bfloat16))
        embed = f.get_tensor("model.embed_tokens.weight").float()
        assert abs(embed.mean().item()) < 1e-3
        assert embed.std().item() == pytest.approx(0.02, rel=0.02)
        assert not torch.equal(embed, f.get_tensor("lm_head.weight").float())


def test_transformers_loads_the_checkpoint_without_key_mismatches(tiny_model_dir: Path) -> None:
    model, info = LlamaForCausalLM.from_pretrained(tiny_model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.tensor([[1, 100, 200, 300]])).logits
    assert logits.shape == (1, 4, 2048)
    assert torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "The KV cache is paged: 16 tokens per block.",
    "  leading and trailing spaces  \n\n\ttabs\r\n",
    "café naïve Zürich — “quotes” … ½",
    "日本語のテキスト, 中文, 한국어, русский",
    "emoji: 🙂🚀✅🔥👩‍👩‍👧 and flags 🇳🇱",
    '{"model": "tiny", "max_tokens": 64}',
    "",
])
def test_tokenizer_round_trips(hf_tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = hf_tokenizer.encode(text)
    assert hf_tokenizer.decode(ids) == text
    assert all(0 <= i < 2048 for i in ids)


def test_tokenizer_vocabulary_and_special_tokens(hf_tokenizer: PreTrainedTokenizerFast) -> None:
    assert len(hf_tokenizer) == 2048
    assert hf_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert hf_tokenizer.eos_token_id == 2 and hf_tokenizer.pad_token_id == 0
    assert hf_tokenizer.bos_token_id is None
    # No BOS or EOS is added to plain text, and special tokens in text are single ids.
    assert hf_tokenizer.encode("<|im_start|>user") == [1, *hf_tokenizer.encode("user")]
    # The corpus taught it real merges: common words are one token.
    assert len(hf_tokenizer.encode(" the")) == 1
    assert len(hf_tokenizer.encode("The scheduler")) < len("The scheduler") // 2


def test_chat_template_renders_chatml(hf_tokenizer: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    without = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without == rendered.removesuffix("<|im_start|>assistant\n")


def test_resolve_tiny_builds_once_then_reuses(tmp_path: Path, tiny_model_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def counting_build(out_dir: Path) -> Path:
        calls.append(Path(out_dir))
        return build_tiny_model(out_dir)

    monkeypatch.setattr(registry, "build_tiny_model", counting_build)
    first = resolve_model("tiny", cache_dir=tmp_path)
    second = resolve_model("tiny", cache_dir=str(tmp_path))
    assert first == second == tmp_path / "models" / "tiny-v1"
    assert calls == [first]
    assert _contents(first) == _contents(tiny_model_dir)


def test_resolve_tiny_uses_the_cache_dir_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path / "cache"))
    assert resolve_model("tiny") == tmp_path / "cache" / "models" / "tiny-v1"
    assert (tmp_path / "cache" / "models" / "tiny-v1" / "config.json").is_file()


def test_resolve_an_existing_model_folder(tiny_model_dir: Path) -> None:
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_resolve_a_folder_without_config_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))


def test_resolve_a_file_fails_clearly(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model(str(tiny_model_dir / "config.json"))


@pytest.mark.parametrize("name", ["/no/such/model/folder", "./missing-model", "not a model!", ""])
def test_resolve_an_unknown_name_lists_the_options(name: str) -> None:
    with pytest.raises(ModelLoadError) as err:
        resolve_model(name)
    message = str(err.value)
    assert "'tiny'" in message and "local folder" in message and "org/name" in message


def test_resolve_a_hub_id_that_cannot_be_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError) as err:
        resolve_model("some-org/some-model")
    message = str(err.value)
    assert "could not be fetched" in message and "network is unreachable" in message
    assert "local folder" in message


def test_resolve_a_hub_id_passes_the_file_patterns(tiny_model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    seen: dict[str, object] = {}

    def fake_download(repo_id: str, **kwargs: object) -> str:
        seen.update(kwargs, repo_id=repo_id)
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model("some-org/some-model") == tiny_model_dir
    assert seen["repo_id"] == "some-org/some-model"
    assert seen["allow_patterns"] == ["*.json", "*.safetensors", "*.model", "*.txt"]
