"""Greedy parity with Hugging Face transformers on the same weights (float32, CPU).

Each architecture gets a tiny random checkpoint made by transformers itself, with biases and norm
weights randomized too (the defaults, zeros and ones, would hide a mis-mapped tensor). The
engine must produce the same 64 greedy tokens for every prompt, and the same logprobs within
1e-4, whatever the batching: prefix caching on or off, prefill forced into chunks, and a KV cache
too small for all prompts at once (forcing preemption and recompute).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from worker import LLM, SamplingParams

VOCAB = 512
NUM_NEW = 64
PROMPT_LENS = [1, 7, 16, 17, 64, 130, 255, 300]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              bos_token_id=None, eos_token_id=None, pad_token_id=0)

ARCHS = {
    "llama3.1": (transformers.LlamaConfig, dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 256})),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None)),
}
MODEL_CLASSES = {
    "llama3.1": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
    "mistral": transformers.MistralForCausalLM,
}


@dataclass
class Reference:
    model_dir: Path
    prompts: list[list[int]]
    tokens: list[list[int]]
    logprobs: list[list[float]]


def _make_checkpoint(arch: str, out_dir: Path) -> transformers.PreTrainedModel:
    config_cls, extra = ARCHS[arch]
    config = config_cls(**COMMON, **extra)
    torch.manual_seed(1234)
    model = MODEL_CLASSES[arch](config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    # Sharded save for one architecture, so the index-file path is covered.
    shard = "60KB" if arch == "qwen2" else "100MB"
    model.save_pretrained(out_dir, max_shard_size=shard, safe_serialization=True)
    return model


def _hf_greedy(model: transformers.PreTrainedModel, prompt: list[int]
               ) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_NEW,
                             min_new_tokens=NUM_NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                for step, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs


@pytest.fixture(scope="module", params=sorted(ARCHS))
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    arch = request.param
    model_dir = tmp_path_factory.mktemp(arch)
    model = _make_checkpoint(arch, model_dir)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    # Two prompts share a long prefix with another, so prefix-cache hits happen.
    prompts.append(prompts[6][:200] + prompts[3][:20])
    prompts.append(prompts[7][:150])
    tokens, logprobs = zip(*(_hf_greedy(model, p) for p in prompts), strict=True)
    return Reference(model_dir, prompts, list(tokens), list(logprobs))


GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=0)


def _run(ref: Reference, device: str = "cpu", **engine_options: object) -> tuple[LLM, list]:
    llm = LLM(str(ref.model_dir), dtype="float32", device=device, **engine_options)
    return llm, llm.generate(ref.prompts, GREEDY, use_tqdm=False)


def _assert_matches(ref: Reference, results: list) -> None:
    for i, result in enumerate(results):
        out = result.outputs[0]
        assert out.token_ids == ref.tokens[i], f"prompt {i} (len {len(ref.prompts[i])}) differs"
        assert out.finish_reason == "length"
        ours = [entry[t].logprob for entry, t in zip(out.logprobs, out.token_ids, strict=True)]
        assert ours == pytest.approx(ref.logprobs[i], abs=1e-4)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_parity(reference: Reference, prefix_caching: bool) -> None:
    llm, results = _run(reference, enable_prefix_caching=prefix_caching)
    _assert_matches(reference, results)
    # A second pass over the same prompts reads the prefix cache when it is on.
    again = llm.generate(reference.prompts, GREEDY, use_tqdm=False)
    _assert_matches(reference, again)
    stats = llm.engine.stats()
    assert (stats.prefix_cache_hits > 0) == prefix_caching
    assert stats.num_free_blocks == stats.num_total_blocks


def test_parity_with_chunked_prefill(reference: Reference) -> None:
    # A 64-token step budget splits every prompt longer than 64 into chunks, mixed with decodes.
    _, results = _run(reference, max_num_batched_tokens=64, enable_prefix_caching=False)
    _assert_matches(reference, results)
    assert max(len(p) for p in reference.prompts) > 64


def test_parity_with_preemption(reference: Reference) -> None:
    # The longest sequence needs 23 blocks; 30 cannot hold all ten prompts at once.
    llm, results = _run(reference, num_kv_blocks=30, enable_prefix_caching=True)
    _assert_matches(reference, results)
    assert llm.engine.stats().num_preemptions > 0


@pytest.mark.gpu
def test_greedy_parity_on_gpu(reference: Reference) -> None:
    """Both sides on the GPU in float32 (no TF32), same checkpoint as on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    hf = transformers.AutoModelForCausalLM.from_pretrained(reference.model_dir,
                                                           dtype=torch.float32).cuda().eval()
    tokens, logprobs = zip(*(_hf_greedy(hf, p) for p in reference.prompts), strict=True)
    gpu_ref = Reference(reference.model_dir, reference.prompts, list(tokens), list(logprobs))
    # An explicit cache size: by default an engine takes most of the free GPU memory, and
    # engines of earlier parametrizations may not be collected yet.
    _, results = _run(gpu_ref, device="cuda", max_num_batched_tokens=128,
                      kv_cache_memory_bytes=256 * 2**20)
    _assert_matches(gpu_ref, results)
