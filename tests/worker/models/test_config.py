"""Model configs as real checkpoints ship them, and the config-only (dummy weights) path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from worker import LLM, SamplingParams
from worker.engine.errors import ModelLoadError
from worker.models.config import ModelConfig
from worker.models.llama import rope_inv_freq
from worker.models.registry import SHIPPED_CONFIGS_DIR, resolve_model

# Published parameter counts of the shipped architectures, in billions.
EXPECTED_PARAMS_B = {"llama-3.1-8b": 8.03, "qwen2.5-7b": 7.62, "qwen3-0.6b": 0.596,
                     "mistral-7b": 7.25}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS_B))
def test_shipped_configs_parse(name: str) -> None:
    cfg = ModelConfig.from_dir(resolve_model(name))
    assert cfg.num_params / 1e9 == pytest.approx(EXPECTED_PARAMS_B[name], rel=0.01)
    assert cfg.qkv_bias == (name == "qwen2.5-7b")
    assert cfg.qk_norm == (name == "qwen3-0.6b")
    assert cfg.tie_word_embeddings == (name == "qwen3-0.6b")
    assert cfg.eos_token_ids


def test_llama3_rope_frequencies_match_reference() -> None:
    # The shipped config uses the older rope_theta + rope_scaling layout.
    model_dir = SHIPPED_CONFIGS_DIR / "llama-3.1-8b"
    cfg = ModelConfig.from_dir(model_dir)
    assert cfg.rope.rope_type == "llama3" and cfg.rope.factor == 8.0
    reference, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(model_dir), "cpu")
    assert torch.equal(rope_inv_freq(cfg.head_dim, cfg.rope), reference.float())


def _downsized(name: str, out: Path) -> Path:
    raw = json.loads((SHIPPED_CONFIGS_DIR / name / "config.json").read_text())
    raw.update(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=300,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(raw))
    return out


def test_dummy_weights_run_from_a_config_alone(tmp_path: Path) -> None:
    model_dir = _downsized("qwen3-0.6b", tmp_path / "qwen3-small")
    llm = LLM(str(model_dir), device="cpu", load_format="dummy")
    assert llm.tokenizer is None  # token ids in, token ids out
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0.0, max_tokens=5,
                                                      ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5
    with pytest.raises(ModelLoadError, match="dummy"):
        LLM(str(model_dir), device="cpu")  # no weights, and not asked for dummy ones
    with pytest.raises(Exception, match="no tokenizer"):
        llm.generate("text needs a tokenizer", use_tqdm=False)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    model_dir = _downsized("llama-3.1-8b", tmp_path / "other")
    raw = json.loads((model_dir / "config.json").read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=r"unsupported architecture.*LlamaForCausalLM"):
        ModelConfig.from_dir(model_dir)


def test_unsupported_rope_type_is_named(tmp_path: Path) -> None:
    model_dir = _downsized("llama-3.1-8b", tmp_path / "yarn")
    raw = json.loads((model_dir / "config.json").read_text())
    raw["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (model_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="rope type 'yarn'"):
        ModelConfig.from_dir(model_dir)


def test_missing_tensor_is_reported(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks 1 tensors"):
        LLM(str(broken), device="cpu")
