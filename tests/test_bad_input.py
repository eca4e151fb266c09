"""Bad input raises ValueError naming the problem, and the same LLM keeps serving."""
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams

OK = SamplingParams(temperature=0, max_tokens=4)


@pytest.fixture(scope="module")
def llm(tiny_model):
    llm = LLM(tiny_model, max_model_len=256, max_num_seqs=16)
    yield llm
    from tests.conftest import assert_no_leaks
    assert_no_leaks(llm)


@pytest.mark.parametrize("prompt, sp, message", [
    ("", OK, "empty"),
    ([], OK, "empty"),
    ("word " * 400, OK, "max_model_len"),
    ([10**9], OK, "out of range"),
    (None, OK, "prompt must be"),
    ([1.5, 2.0], OK, "integers"),
    ([2**70], OK, "out of range"),
], ids=["empty-text", "empty-ids", "too-long", "bad-token-id", "not-a-prompt", "float-ids", "huge-token-id"])
def test_bad_requests(llm, prompt, sp, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], sp, use_tqdm=False)
    assert llm.generate(["still serving"], OK, use_tqdm=False)[0]["token_ids"]


def test_bad_params_in_a_batch_queue_nothing(llm):
    sp = SamplingParams(temperature=0, max_tokens=4)
    bad = SamplingParams(temperature=0, max_tokens=4)
    bad.temperature = -1.0  # mutated after construction: checked again when the request is added
    with pytest.raises(ValueError, match="temperature"):
        llm.generate(["a", "b"], [sp, bad], use_tqdm=False)
    assert llm.is_finished()
    with pytest.raises(ValueError, match="top_p"):
        llm.generate(["a"], SamplingParams(top_p=0), use_tqdm=False)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate(["a"], SamplingParams(max_tokens=0), use_tqdm=False)
    assert llm.generate(["still serving"], OK, use_tqdm=False)[0]["token_ids"]


def test_generate_leaves_the_garbage_collector_as_found(llm, monkeypatch):
    """generate keeps the collector off its requests while it runs (frozen once queued: llm.py's doc) and
    leaves it as found, enabled or not, with nothing frozen after, also when a request is refused; objects a
    caller froze before are unfrozen with the rest (no partial unfreeze exists), and a generate after that
    starts with nothing frozen (it never walks a growing frozen set)."""
    import gc
    seen = []
    step = llm.step

    def watched():
        seen.append((gc.isenabled(), gc.get_freeze_count() > 0))
        return step()
    monkeypatch.setattr(llm, "step", watched)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert llm.generate(["a", "b"], OK, use_tqdm=False)[0]["token_ids"]
    assert seen and all(on and frozen for on, frozen in seen)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["a", ""], OK, use_tqdm=False)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        seen.clear()
        llm.generate(["a"], OK, use_tqdm=False)
        assert seen and not any(on for on, _ in seen) and not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()
    gc.freeze()
    try:
        seen.clear()
        llm.generate(["a"], OK, use_tqdm=False)
        assert seen and all(frozen for _, frozen in seen) and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
    assert llm.is_finished()


def test_unknown_model_folder(tmp_path):
    with pytest.raises(ValueError, match="model folder not found"):
        LLM(str(tmp_path / "nope"))


def test_unknown_option(tiny_model):
    with pytest.raises(ValueError, match="unknown engine options"):
        LLM(tiny_model, not_an_option=1)


def test_checkpoint_missing_a_tensor(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = load_file(os.path.join(broken, "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    del weights[name]
    save_file(weights, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        LLM(str(broken))


def test_request_that_can_never_fit_the_cache(tiny_model, make_llm):
    llm = make_llm(tiny_model, num_kvcache_blocks=4)  # 64 tokens of KV in all
    with pytest.raises(ValueError, match="KV cache"):
        llm.generate(["word " * 40], SamplingParams(max_tokens=100), use_tqdm=False)
    assert llm.generate(["short"], OK, use_tqdm=False)[0]["token_ids"]


def test_float32_with_flashinfer_is_refused_clearly(tiny_model):
    """FlashInfer's attention has no float32 kernels: a clear error, not a crash inside it."""
    with pytest.raises(ValueError, match="bfloat16 or float16.*attention_backend='torch'"):
        LLM(tiny_model, device="cuda", dtype="float32", attention_backend="flashinfer")


def test_head_dim_flashinfer_cannot_run_is_refused_clearly(tiny_model):
    """FlashInfer's kernels have no head_dim 16 (the tiny presets'): a clear error before any device work,
    not FlashInfer's "Invalid configuration" from inside graph capture."""
    with pytest.raises(ValueError, match="head_dim in .*this model has 16.*attention_backend='torch'"):
        LLM(tiny_model, device="cuda", dtype="bfloat16", attention_backend="flashinfer")


def test_unknown_blas_library_is_refused_before_the_model_loads(tiny_model, monkeypatch):
    monkeypatch.setenv("NANOVLLM_BLAS_LIBRARY", "mkl")
    with pytest.raises(ValueError, match="NANOVLLM_BLAS_LIBRARY must be cublaslt, cublas or default"):
        LLM(tiny_model)
