"""Overlapped steps: pages are hashed only once their tokens are real, also through preemption."""
import numpy as np

from nanovllm import SamplingParams

SEEDED = [SamplingParams(temperature=1.0, seed=s, max_tokens=24, ignore_eos=True) for s in (1, 2)]


def test_no_page_is_hashed_with_a_placeholder(tiny_model, make_llm):
    reference = make_llm(tiny_model, kvcache_block_size=4, num_kvcache_blocks=64)
    expected = [o["token_ids"] for o in reference.generate([[5, 6, 7], [5, 6, 7]], SEEDED, use_tqdm=False)]
    llm = make_llm(tiny_model, kvcache_block_size=4, num_kvcache_blocks=9)  # tight: preemption happens
    for sp in SEEDED:
        llm.add_request([5, 6, 7], sp)
    seqs = list(llm.seqs.values())
    while not llm.is_finished():
        llm.step()
        for block in llm.scheduler.block_manager.blocks:
            if block.hash != -1:
                assert not (np.frombuffer(block.token_key, dtype=np.int64) == -1).any(), "placeholder hashed"
    assert llm.scheduler.num_preemptions > 0
    assert [s.completion_token_ids for s in seqs] == expected
