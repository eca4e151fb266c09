"""Logits and greedy generation against Hugging Face transformers' own model on the same weights."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanovllm import SamplingParams

PROMPTS = [
    "The small engine reads a prompt",
    "Hello",
    "A heron stood in the shallows, watching the water with great patience, while the town woke.",
    "def forward(self, x): return x",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25",
    "Café, naïve, 你好世界 🙂",
    "Q: What is the capital of France? A:",
    "Memory is the scarce resource. Keys and values for every past position are kept in a cache "
    "that is cut into fixed-size blocks, so that many requests can share one pool without copying.",
]


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def engine_logits(llm, token_lists, num_decode_steps):
    """Drive the engine step by step with teacher-forced greedy tokens; returns per-request logits rows."""
    seqs = [llm.add_request(t, SamplingParams(temperature=0, max_tokens=num_decode_steps + 1, ignore_eos=True))
            for t in token_lists]
    rows = {s.seq_id: [] for s in seqs}
    runner = llm.model_runner
    while not llm.is_finished():
        batch_seqs, is_prefill = llm.scheduler.schedule()
        step, batch_seqs = llm.step_builder.build(batch_seqs, is_prefill)
        batch, ids, pos = runner.prepare(step)
        with torch.inference_mode():
            logits = runner.forward(batch, ids, pos)
        for s, row in zip(batch_seqs, logits):
            if s.num_computed_tokens + s.chunk_len == len(s):
                rows[s.seq_id].append(row.clone())
        samples = llm.launched(batch_seqs)
        llm.postprocess(batch_seqs, logits.argmax(-1).tolist(), samples)
    return [(s, torch.stack(rows[s.seq_id])) for s in seqs]


@pytest.mark.parametrize("preset", ["qwen3-tiny", "qwen3-tiny-hd", "qwen2-tiny"])
def test_logits_match_transformers(model_dirs, make_llm, preset):
    path = model_dirs[preset]
    tok = AutoTokenizer.from_pretrained(path)
    ref = hf_model(path)
    llm = make_llm(path)
    token_lists = [tok.encode(p) for p in PROMPTS[:5]]
    steps = 6
    for seq, ours in engine_logits(llm, token_lists, steps):
        full = torch.tensor([seq.token_ids])
        with torch.no_grad():
            theirs = ref(full).logits[0]
        n = seq.num_prompt_tokens
        # row 0: prefill logits of the last prompt token; rows 1..: one decode step each
        expected = theirs[n - 1:n - 1 + len(ours)]
        assert ours.shape == expected.shape
        diff = (ours - expected).abs().max().item()
        assert diff <= 1e-4, f"{preset}: max abs logit diff {diff}"


def hf_greedy(path, prompts, max_new_tokens):
    tok = AutoTokenizer.from_pretrained(path)
    model = hf_model(path)
    outs = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p) if isinstance(p, str) else p])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


@pytest.fixture(scope="module")
def hf_reference(tiny_model):
    return hf_greedy(tiny_model, PROMPTS, 24)


GREEDY = SamplingParams(temperature=0, max_tokens=24)


def test_greedy_generate_matches_transformers(tiny_model, make_llm, hf_reference):
    llm = make_llm(tiny_model)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == hf_reference
    assert llm.stats["max_batch_size"] > 1
    # (a) again: the prompts now come from the prefix cache
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == hf_reference
    assert sum(o["num_cached_tokens"] for o in outs) > 0


def test_greedy_with_preemption(tiny_model, make_llm, hf_reference):
    # 12 pages of 16 tokens: the batch cannot hold every request's growth, so some are preempted.
    llm = make_llm(tiny_model, num_kvcache_blocks=12)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == hf_reference
    assert llm.scheduler.num_preemptions > 0
    # re-admission hits the request's own output too: cached counts stay prompt tokens
    assert all(o["num_cached_tokens"] < len(o["prompt_token_ids"]) for o in outs)


def test_greedy_with_chunked_prefill(tiny_model, make_llm, hf_reference):
    llm = make_llm(tiny_model, max_num_batched_tokens=8)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == hf_reference
    assert llm.stats["prefill_steps"] > len(PROMPTS)


def test_shared_prefix_admitted_together(tiny_model, make_llm):
    """Two requests with the same 3-page prefix arrive together: the second must wait for the first
    to compute the shared pages, then hit them, never read pages registered but not yet written."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    system = tok.encode(PROMPTS[7] + " " + PROMPTS[2])[:48]
    prompts = [system + tok.encode(" first question"), system + tok.encode(" second one here")]
    expected = hf_greedy(tiny_model, prompts, 12)
    llm = make_llm(tiny_model)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected
    assert outs[0]["num_cached_tokens"] == 0
    assert outs[1]["num_cached_tokens"] == 48


def test_every_eos_id_of_the_checkpoint_ends_generation(tiny_model, make_llm, tmp_path):
    """generation_config.json may list several EOS ids (instruct checkpoints do): each one stops."""
    import json
    import shutil
    free = make_llm(tiny_model).generate(["The river"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                                         use_tqdm=False)[0]["token_ids"]
    model = tmp_path / "two-eos"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], free[3]]
    (model / "generation_config.json").write_text(json.dumps(config))
    llm = make_llm(str(model))
    out = llm.generate(["The river"], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert out["finish_reason"] == "stop"
    assert out["token_ids"] == free[:free.index(free[3]) + 1]
