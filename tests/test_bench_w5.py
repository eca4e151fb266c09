"""bench.py's W5 (long shared documents), scaled down to run on CPU: every request gets its output
tokens, each document is prefilled once and served from the prefix cache to its other requests,
no page leaks; the greedy tokens equal a run without the prefix cache."""
import functools

from nanovllm import benchmark

SMALL = dict(documents=3, per_document=4, document_len=64, question_len=8, output_len=6)


def test_w5_documents_come_from_the_prefix_cache(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setitem(benchmark.WORKLOADS, "w5", (functools.partial(benchmark.w5, **SMALL),
                                                    dict(max_num_seqs=12, max_model_len=64 + 8 + 6)))
    common = ["--model", tiny_model, "--workload", "w5", "--kvcache-block-size", "8", "--json", str(tmp_path / "r.jsonl")]
    for result in (benchmark.main(common), benchmark.main(common + ["--enable-cascade-attention"])):
        assert result["requests"] == 12 and result["output_tokens"] == 12 * 6 and result["finished_stop"] == 0
        assert result["prompt_tokens"] == 12 * (64 + 8)
        # Each document's 8 full pages come from the cache for the 3 requests after its first one; the
        # questions (one page holding the prompt's last token) are always computed.
        assert result["cached_prompt_tokens"] == 3 * 3 * 64
        assert result["recomputed_prompt_tokens"] == 3 * 64 + 12 * 8
        assert result["leaked_blocks"] == 0


def test_w5_shape_and_greedy_tokens_match_a_run_without_prefix_cache(tiny_model, make_llm):
    top = 500
    prompts, params = benchmark.w5(top, **SMALL)
    assert len(prompts) == 12 and all(len(p) == 72 for p in prompts)
    assert all(0 <= t <= top for p in prompts for t in p)
    assert len({tuple(p[:64]) for p in prompts}) == 3 and len({tuple(p) for p in prompts}) == 12
    assert [tuple(p[:64]) for p in prompts] != sorted(tuple(p[:64]) for p in prompts)  # shuffled
    assert all(s.temperature == 0 and s.ignore_eos and s.max_tokens == 6 for s in params)
    assert benchmark.w5(top, **SMALL)[0] == prompts  # fixed seed
    full = benchmark.w5()
    assert len(full[0]) == 128 and {len(p) for p in full[0]} == {16384 + 64} and full[1][0].max_tokens == 512
    _, cfg = benchmark.WORKLOADS["w5"]
    assert cfg["max_model_len"] >= 16384 + 64 + 512 and cfg["max_num_seqs"] >= 128
    cached = make_llm(tiny_model, kvcache_block_size=8, max_model_len=128)
    plain = make_llm(tiny_model, kvcache_block_size=8, max_model_len=128, enable_prefix_caching=False)
    a = cached.generate(prompts, params, use_tqdm=False)
    b = plain.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in a] == [o["token_ids"] for o in b]
    assert sum(o["num_cached_tokens"] for o in a) == 3 * 3 * 64
