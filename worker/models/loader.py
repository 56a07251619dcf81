"""Builds a model on a device and fills its weights from safetensors or with dummy values."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

try:  # a progress bar where tqdm is installed; the engine does not require it
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

from worker.engine.errors import ModelLoadError
from worker.models.config import ModelConfig
from worker.models.llama import LlamaForCausalLM, RotaryEmbedding, rope_inv_freq

log = logging.getLogger(__name__)

# checkpoint name part -> (fused parameter name part, shard index within the fused tensor)
_STACKED = (
    (".q_proj.", ".qkv_proj.", 0),
    (".k_proj.", ".qkv_proj.", 1),
    (".v_proj.", ".qkv_proj.", 2),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)
LOAD_FORMATS = ("auto", "safetensors", "dummy")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """"auto" means float32 on the CPU (fast and exact there) and the checkpoint's dtype on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(cfg.dtype, torch.bfloat16)
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def load_model(model_dir: str | Path | None, cfg: ModelConfig, device: torch.device,
               dtype: torch.dtype, load_format: str = "auto", seed: int = 0,
               use_triton: bool = False) -> LlamaForCausalLM:
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load format {load_format!r}; use one of {LOAD_FORMATS}")
    # Build on the meta device in the target dtype, so no memory is touched (or converted)
    # until the real weights arrive.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg, use_triton)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own tensor
        model.lm_head.weight = model.model.embed_tokens.weight
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope).to(device)
    cos_sin_cache = None
    if use_triton:  # one table for all layers: every layer rotates by the same angles
        from kernels.rotary import build_cos_sin_cache

        cos_sin_cache = build_cos_sin_cache(inv_freq, cfg.max_position_embeddings, device)
    for module in model.modules():  # rotary frequencies are computed, not loaded
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = inv_freq
            module.cos_sin_cache = cos_sin_cache
    if load_format == "dummy":
        fill_dummy_weights(model, seed)
    else:
        if model_dir is None:
            raise ModelLoadError("a model directory is needed unless load_format is 'dummy'")
        load_safetensors(model, Path(model_dir))
    return model.eval()


def fill_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights of a realistic scale, for benchmarks that need no real checkpoint."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir}; to run the architecture "
                             "with random weights, use load format 'dummy'")
    return files


def iter_checkpoint(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    names = []
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names += [(f, k) for k in sf.keys()]  # noqa: SIM118 (safe_open is not a dict)
    show = len(names) > 200 and tqdm is not None
    bar = tqdm(total=len(names), desc="loading weights", unit="tensor") if show else None
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as sf:
            for key in sf.keys():  # noqa: SIM118
                yield key, sf.get_tensor(key)
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()


def load_safetensors(model: LlamaForCausalLM, model_dir: Path) -> None:
    cfg = model.config
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in iter_checkpoint(checkpoint_files(model_dir), device):
            if "rotary_emb" in name:
                continue
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue
            target, rows = _target(name, cfg)
            if target not in params:
                raise ModelLoadError(f"checkpoint tensor {name} has no place in {cfg.architecture}")
            param = params[target]
            dst = param if rows is None else param.narrow(0, rows[0], rows[1])
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(name if rows is None else f"{target}#{rows[0]}")
    expected = _expected_names(model)
    missing = expected - loaded
    if missing:
        raise ModelLoadError(f"checkpoint in {model_dir} lacks {len(missing)} tensors, "
                             f"e.g. {sorted(missing)[:3]}")


def _target(name: str, cfg: ModelConfig) -> tuple[str, tuple[int, int] | None]:
    """Maps a checkpoint name to (model parameter, (first row, num rows) or None)."""
    for part, fused, shard in _STACKED:
        if part in name:
            sizes: tuple[int, ...] = (
                (cfg.q_size, cfg.kv_size, cfg.kv_size) if fused == ".qkv_proj."
                else (cfg.intermediate_size, cfg.intermediate_size))
            return name.replace(part, fused), (sum(sizes[:shard]), sizes[shard])
    return name, None


def _expected_names(model: LlamaForCausalLM) -> set[str]:
    cfg = model.config
    out = set()
    for name, _ in model.named_parameters():  # tied lm_head is listed once, under embed_tokens
        if ".qkv_proj." in name:
            out |= {f"{name}#0", f"{name}#{cfg.q_size}", f"{name}#{cfg.q_size + cfg.kv_size}"}
        elif ".gate_up_proj." in name:
            out |= {f"{name}#0", f"{name}#{cfg.intermediate_size}"}
        else:
            out.add(name)
    return out
