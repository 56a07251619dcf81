"""The built-in tiny model: a random-weight Llama checkpoint built from fixed inputs.

It has the file layout and architecture of a real Hugging Face Llama checkpoint, so the loader,
tokenizer, chat template and kernels are all exercised, yet it is a few MB and is rebuilt
byte for byte from the corpus in `data/` and a fixed seed: no download, no stored weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from worker.engine.errors import ModelLoadError

# Bump when anything below or the corpus changes: caches key the built folder by this name.
TINY_MODEL_DIRNAME = "tiny-v1"
CORPUS_PATH = Path(__file__).parent / "data" / "tiny_corpus.txt"
SEED = 20240611
INIT_STD = 0.02

VOCAB_SIZE = 2048
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 384
NUM_LAYERS = 4
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 32
MAX_POSITIONS = 2048

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Order fixes the ids: 0, 1, 2.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
PAD_TOKEN_ID, EOS_TOKEN_ID = 0, 2

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_model(out_dir: str | Path) -> Path:
    """Write the tiny checkpoint to `out_dir` and return it.

    The folder appears complete or not at all: it is built next to `out_dir` and renamed into
    place. If `out_dir` already holds a model (a concurrent build won the rename), that one is
    kept; builds are byte-identical, so nothing is lost.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_files(tmp)
        # mkdtemp makes the folder private; a model cache is meant to be shared.
        tmp.chmod(0o755)
        try:
            os.rename(tmp, out)
        except OSError as exc:
            if not (out / "config.json").is_file():
                raise ModelLoadError(
                    f"cannot create the tiny model at {out}: the path exists and is not an "
                    f"empty folder ({exc})") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_files(folder: Path) -> None:
    _write_text(folder / "tokenizer.json", train_tokenizer_json())
    _write_json(folder / "tokenizer_config.json", _tokenizer_config())
    _write_json(folder / "special_tokens_map.json", _special_tokens_map())
    _write_json(folder / "config.json", _model_config())
    _write_json(folder / "generation_config.json",
                {"eos_token_id": [EOS_TOKEN_ID, PAD_TOKEN_ID], "pad_token_id": PAD_TOKEN_ID})
    weights = safetensors_save(_weights(), metadata={"format": "pt"})
    (folder / "model.safetensors").write_bytes(weights)


def train_tokenizer_json() -> str:
    """Train the byte-level BPE tokenizer on the corpus; returns tokenizer.json's text."""
    try:
        # Bytes, not text mode: newline translation must not change the training data.
        corpus = CORPUS_PATH.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read the tiny model's corpus {CORPUS_PATH}: {exc}") from exc
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One sequence, not lines: the trainer then sees the text exactly as it is in the file.
    tok.train_from_iterator([corpus], trainer=trainer)
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise ModelLoadError(
            f"the tiny corpus yields {tok.get_vocab_size(with_added_tokens=True)} tokens, "
            f"not {VOCAB_SIZE}; it is too small for the vocabulary")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != expected_id:
            raise ModelLoadError(f"special token {token} did not get id {expected_id}")
    return tok.to_str(pretty=True) + "\n"


def _tokenizer_config() -> dict[str, Any]:
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        # The cleanup strips spaces before punctuation: lossy for byte-level BPE.
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "model_max_length": MAX_POSITIONS,
        "pad_token": ENDOFTEXT,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def _special_tokens_map() -> dict[str, Any]:
    return {"additional_special_tokens": [IM_START, IM_END], "eos_token": IM_END,
            "pad_token": ENDOFTEXT}


def _model_config() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "dtype": "bfloat16",
        "eos_token_id": EOS_TOKEN_ID,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "pad_token_id": PAD_TOKEN_ID,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }


def weight_shapes() -> dict[str, tuple[int, ...]]:
    """Every parameter of the checkpoint, named as Hugging Face's Llama names them."""
    q_out, kv_out = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (VOCAB_SIZE, HIDDEN_SIZE),
        "model.norm.weight": (HIDDEN_SIZE,),
        "lm_head.weight": (VOCAB_SIZE, HIDDEN_SIZE),
    }
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (q_out, HIDDEN_SIZE),
            f"{p}.self_attn.k_proj.weight": (kv_out, HIDDEN_SIZE),
            f"{p}.self_attn.v_proj.weight": (kv_out, HIDDEN_SIZE),
            f"{p}.self_attn.o_proj.weight": (HIDDEN_SIZE, q_out),
            f"{p}.mlp.gate_proj.weight": (INTERMEDIATE_SIZE, HIDDEN_SIZE),
            f"{p}.mlp.up_proj.weight": (INTERMEDIATE_SIZE, HIDDEN_SIZE),
            f"{p}.mlp.down_proj.weight": (HIDDEN_SIZE, INTERMEDIATE_SIZE),
            f"{p}.input_layernorm.weight": (HIDDEN_SIZE,),
            f"{p}.post_attention_layernorm.weight": (HIDDEN_SIZE,),
        })
    return shapes


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in sorted(weight_shapes().items()):
        if len(shape) == 1:  # RMSNorm scales
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (_standard_normal(shape, gen) * INIT_STD).to(torch.bfloat16)
    return tensors


def _standard_normal(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Box-Muller over float64 uniforms.

    torch's own float32 normal_ takes a SIMD path on some CPUs and a scalar one on others, and
    the two differ in the last bits, which bfloat16 rounding can expose. Uniform draws are
    produced serially from the generator, and float64 arithmetic leaves far more margin than
    bfloat16 can see, so this gives the same weights on every machine.
    """
    n = math.prod(shape)
    u = torch.rand(2 * ((n + 1) // 2), dtype=torch.float64, generator=gen)
    u1, u2 = u[0::2], u[1::2]
    radius = torch.sqrt(-2.0 * torch.log1p(-u1))  # 1 - u1 lies in (0, 1]: no log(0)
    angle = 2.0 * math.pi * u2
    z = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1).reshape(-1)
    return z[:n].reshape(shape)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _write_text(path: Path, text: str) -> None:
    # newline="\n": the same bytes on every OS.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
