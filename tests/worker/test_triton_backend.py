"""The engine on the Triton kernels gives the torch backend's greedy tokens.

On the CPU the kernels run in the Triton interpreter (slow, so the workload is small); on a GPU
the same test runs them compiled.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker import LLM, SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.slow
def test_triton_backend_matches_torch_backend(tiny_model_dir: Path) -> None:
    prompts = [[5, 6, 7], list(range(100, 140)), [9] * 21]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
    # A 16-token step budget chunks the 40-token prompt, so chunks attend to a cached prefix.
    options = dict(device=DEVICE, dtype="float32", max_num_batched_tokens=16,
                   kv_cache_memory_bytes=16 * 2**20, cuda_graph_max_batch=4)
    torch_llm = LLM(str(tiny_model_dir), attention_backend="torch", **options)
    triton_llm = LLM(str(tiny_model_dir), attention_backend="triton", **options)
    assert triton_llm.engine.attention_backend == "triton"
    expected = torch_llm.generate(prompts, params, use_tqdm=False)
    got = triton_llm.generate(prompts, params, use_tqdm=False)
    for want, have in zip(expected, got, strict=True):
        assert have.outputs[0].token_ids == want.outputs[0].token_ids
        lp_want = [e[t].logprob for e, t in zip(want.outputs[0].logprobs,
                                                want.outputs[0].token_ids, strict=True)]
        lp_have = [e[t].logprob for e, t in zip(have.outputs[0].logprobs,
                                                have.outputs[0].token_ids, strict=True)]
        assert lp_have == pytest.approx(lp_want, abs=1e-4)
    # A second pass reads the prefix cache through the kernels too.
    again = triton_llm.generate(prompts, params, use_tqdm=False)
    assert [r.outputs[0].token_ids for r in again] == [r.outputs[0].token_ids for r in expected]
    assert triton_llm.engine.stats().prefix_cache_hits > 0


def test_auto_backend_is_torch_without_a_gpu(tiny_model_dir: Path) -> None:
    if DEVICE == "cuda":
        pytest.skip("a GPU is present")
    llm = LLM(str(tiny_model_dir), device="cpu", kv_cache_memory_bytes=2**20)
    assert llm.engine.attention_backend == "torch"
