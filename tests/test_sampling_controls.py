"""Sampling controls (presence / frequency / repetition penalties, logit_bias, min_p, min_tokens) against
references written here in float64, on random logits and histories and end to end on the tiny model
(greedy decoding checked step by step against transformers' own model and its repetition-penalty
processor), and the stop rules of the output processor that min_tokens changes."""
import math
import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from nanovllm import SamplingParams
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.sequence import PLACEHOLDER, Sequence
from nanovllm.engine.step_builder import StepBuilder
from nanovllm.layers.logits_processor import process_logits
from nanovllm.layers.sampler import Sampler
from nanovllm.tools.make_model import make_model

VOCAB = 97
EOS = (3, 5)


def builder() -> StepBuilder:
    config = SimpleNamespace(kvcache_block_size=16, seed=0, enable_cascade_attention=False,
                             hf_config=SimpleNamespace(vocab_size=VOCAB), eos_token_ids=EOS)
    return StepBuilder(config)


def make_seq(rng: random.Random, sp: SamplingParams, pending: bool) -> tuple[Sequence, int | None]:
    """A sequence with a random prompt and output; `pending`: its newest token is still a PLACEHOLDER
    (sampled by the step in flight), returned as the value it has on the device."""
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))]
    seq = Sequence(prompt, sp, 16)
    seq.token_ids += [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 25))]
    seq.output_array()  # cached part of the way, as between steps
    seq.token_ids += [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 4))]
    newest = None
    if pending:
        newest = rng.randrange(VOCAB)
        seq.token_ids.append(PLACEHOLDER)
        seq.num_pending = 1
    return seq, newest


def reference_logits(logits: np.ndarray, seq: Sequence, newest: int | None) -> np.ndarray:
    """float64, one row, token by token: bias, min_tokens' mask, repetition, frequency, presence."""
    sp = seq.sampling_params
    out = logits.astype(np.float64).copy()
    prompt = list(seq.prompt_token_ids)
    generated = [newest if t == PLACEHOLDER else t for t in seq.completion_token_ids]
    for token, bias in (sp.logit_bias or {}).items():
        out[token] += bias
    if len(generated) < sp.min_tokens:
        for token in list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(EOS)):
            out[token] = -math.inf
    for token in set(prompt) | set(generated):
        p = sp.repetition_penalty
        out[token] = out[token] / p if out[token] > 0 else out[token] * p
    for token, count in Counter(generated).items():
        out[token] -= sp.frequency_penalty * count + sp.presence_penalty
    return out


def random_params(rng: random.Random, max_tokens: int = 64) -> SamplingParams:
    """Each control on or off at random (often all off: mixed batches)."""
    kw = {}
    if rng.random() < 0.5:
        kw["presence_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.5:
        kw["frequency_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.5:
        kw["repetition_penalty"] = rng.choice([rng.uniform(0.5, 2.0), 1.0])
    if rng.random() < 0.4:
        kw["logit_bias"] = {rng.randrange(VOCAB): rng.uniform(-100, 100) for _ in range(rng.randrange(1, 6))}
    if rng.random() < 0.4:
        kw["min_tokens"] = rng.randrange(0, 40)
        kw["stop_token_ids"] = rng.sample(range(VOCAB), rng.randrange(0, 3))
        kw["ignore_eos"] = rng.random() < 0.3
    return SamplingParams(temperature=rng.choice([0.0, 0.7]), max_tokens=max_tokens, **kw)


@pytest.mark.parametrize("seed", range(6))
def test_processed_logits_match_float64_reference(seed):
    """A mixed batch (rows with and without each control, some decode rows whose newest token is still
    on the device) through the step builder and process_logits, against the float64 reference."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    rows = rng.randrange(1, 12)
    seqs, newest = [], []
    for _ in range(rows):
        seq, new = make_seq(rng, random_params(rng), pending=rng.random() < 0.5)
        seqs.append(seq)
        newest.append(new if new is not None else seq.token_ids[-1])
    sampling = builder()._sampling_inputs(seqs)
    logits = torch.randn(rows, VOCAB) * 4
    raw = logits.clone()
    got = process_logits(logits, sampling, torch.tensor(newest)) if sampling.processes_logits else logits
    assert torch.equal(logits, raw), "the raw logits must stay as they were (logprobs read them)"
    for r, seq in enumerate(seqs):
        want = reference_logits(logits[r].numpy(), seq, newest[r] if seq.num_pending else None)
        mine = got[r].double().numpy()
        assert np.array_equal(np.isneginf(mine), np.isneginf(want)), r
        finite = np.isfinite(want)
        np.testing.assert_allclose(mine[finite], want[finite], rtol=1e-5, atol=1e-4)
    # greedy rows sample the argmax of the processed logits
    temperatures = torch.tensor(sampling.temperatures)
    tokens = Sampler()(got, temperatures, generator=torch.Generator().manual_seed(0))
    for r, seq in enumerate(seqs):
        if seq.sampling_params.temperature == 0:
            assert tokens[r] == int(np.argmax(reference_logits(logits[r].numpy(), seq, newest[r] if seq.num_pending else None)))


def test_nothing_is_built_for_a_batch_without_controls():
    rng = random.Random(0)
    seqs = [make_seq(rng, SamplingParams(temperature=t, top_p=0.9), pending=True)[0] for t in (0.0, 1.0)]
    s = builder()._sampling_inputs(seqs)
    assert s.token_bias is None and s.penalties is None and s.min_ps is None and not s.processes_logits
    # only the rows that use a control are in its arrays
    seqs.append(make_seq(rng, SamplingParams(presence_penalty=0.5), pending=False)[0])
    s = builder()._sampling_inputs(seqs)
    assert s.penalties.rows.tolist() == [2] and s.penalties.prompt_ids is None and s.token_bias is None


def test_min_tokens_mask_only_while_below():
    seq = Sequence([1, 2, 3], SamplingParams(min_tokens=2, stop_token_ids=[7], max_tokens=8), 16)
    b = builder()
    assert sorted(b._sampling_inputs([seq]).token_bias.token_ids.tolist()) == [3, 5, 7]
    seq.token_ids += [9, PLACEHOLDER]  # one collected, one in flight: this step samples the third
    seq.num_pending = 1
    assert b._sampling_inputs([seq]).token_bias is None


def reference_min_p_keep(scaled: np.ndarray, min_p: float) -> np.ndarray:
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    return p >= min_p * p.max()


@pytest.mark.parametrize("seed", range(4))
def test_min_p_filter_matches_float64_reference(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 300, generator=g, dtype=torch.float64) * 3
    min_ps = torch.tensor([0.0, 1e-4, 0.01, 0.05, 0.1, 0.3, 0.9, 1.0], dtype=torch.float64)
    got = Sampler.min_p_filter(logits.float(), min_ps.float())
    for r in range(8):
        keep = reference_min_p_keep(logits[r].numpy(), float(min_ps[r]))
        assert np.array_equal(torch.isfinite(got[r]).numpy(), keep), r


def test_min_p_samples_follow_the_renormalized_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0]])
    n = 40000
    temperature, min_p = 0.8, 0.3
    tokens = Sampler()(logits.expand(n, -1).contiguous(), torch.full((n,), temperature),
                       min_ps=torch.full((n,), min_p), generator=torch.Generator().manual_seed(1))
    scaled = logits[0].double().numpy() / temperature
    keep = reference_min_p_keep(scaled, min_p)
    p = np.where(keep, np.exp(scaled - scaled.max()), 0)
    p /= p.sum()
    freq = np.bincount(tokens.numpy(), minlength=8) / n
    assert set(np.flatnonzero(freq)) == set(np.flatnonzero(keep)) and keep.sum() < 8
    assert np.abs(freq - p).max() < 0.015


@pytest.mark.parametrize("kwargs", [dict(presence_penalty=2.5), dict(frequency_penalty=-2.01),
                                    dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
                                    dict(repetition_penalty=1e-60), dict(repetition_penalty=float("inf")),
                                    dict(min_p=1.5), dict(min_p=-0.1), dict(min_tokens=-1),
                                    dict(min_tokens=9, max_tokens=8), dict(logit_bias={5: 101}),
                                    dict(logit_bias={-1: 1.0}), dict(logit_bias={"5": 1.0}),
                                    dict(logit_bias={5: float("nan")}), dict(presence_penalty=float("nan"))])
def test_bad_control_values(kwargs):
    name = next(k for k in kwargs if k != "max_tokens")
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


# ---- end to end on the tiny model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_model):
    from nanovllm import LLM
    from conftest import assert_no_leaks
    llm = LLM(tiny_model, max_model_len=256, max_num_seqs=16)
    yield llm
    assert_no_leaks(llm)


@pytest.fixture(scope="module")
def hf(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def greedy(llm, prompt, **kw):
    return llm.generate([prompt], SamplingParams(temperature=0, **kw), use_tqdm=False)[0]


def test_min_tokens_holds_eos_and_stop_ids_back(llm):
    eos = llm.config.eos_token_ids[0]
    assert greedy(llm, "The river", max_tokens=16, logit_bias={eos: 50})["token_ids"] == [eos]  # EOS comes first
    for min_tokens in (1, 5):
        out = greedy(llm, "The river", max_tokens=16, logit_bias={eos: 50}, min_tokens=min_tokens)
        assert out["finish_reason"] == "stop" and len(out["token_ids"]) == min_tokens + 1
        assert out["token_ids"][-1] == eos and eos not in out["token_ids"][:-1]
    stop_id = 77
    out = greedy(llm, "The river", max_tokens=16, ignore_eos=True, logit_bias={stop_id: 50}, stop_token_ids=[stop_id],
                 min_tokens=4)
    assert out["token_ids"][4:] == [stop_id] and stop_id not in out["token_ids"][:4] and out["finish_reason"] == "stop"
    # min_tokens == max_tokens: EOS never sampled, ends by length
    out = greedy(llm, "The river", max_tokens=6, logit_bias={eos: 50}, min_tokens=6)
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 6 and eos not in out["token_ids"]


def test_min_tokens_defers_stop_strings(llm):
    free = greedy(llm, "The river", max_tokens=12, ignore_eos=True, presence_penalty=2.0)
    pieces = [llm.tokenizer.decode([t]) for t in free["token_ids"]]
    stop = pieces[1].strip() or pieces[1]
    first = greedy(llm, "The river", max_tokens=12, ignore_eos=True, presence_penalty=2.0, stop=[stop])
    assert first["finish_reason"] == "stop" and len(first["token_ids"]) <= 2
    seq = llm.add_request("The river", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                      presence_penalty=2.0, stop=[stop], min_tokens=6), stream=True)
    streamed = ""
    while not llm.is_finished():
        streamed += "".join(o.new_text or "" for o in llm.step() if o.seq is seq)
    final = llm.output_text(seq)
    assert len(seq.completion_token_ids) >= 6 and streamed == final
    assert free["token_ids"][:len(seq.completion_token_ids)] == seq.completion_token_ids
    if seq.finish_reason == "stop":  # a later occurrence, completing at token 6 or after
        assert llm.tokenizer.decode(free["token_ids"][:6]).count(stop) < free["text"].count(stop)


@pytest.mark.parametrize("pieces, can_stop_from, final", [
    ("hihihix", 5, "hi"),       # "hihi" completes at char 4 (too early), again at char 6: cut at 2
    ("hihix", 5, "hihix"),      # the only occurrence completes before stops count
    ("xhihi", 5, "x"),          # completes on the first char where stops count
])
def test_detokenizer_stops_only_once_allowed(pieces, can_stop_from, final):
    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)
    detok = IncrementalDetokenizer(Chars(), ["hihi"])
    out = "".join(detok.add([ord(c)], can_stop=i + 1 >= can_stop_from) for i, c in enumerate(pieces)) + detok.flush()
    assert detok.text == final and out == final


def test_logit_bias_forces_a_token_and_leaves_other_rows_alone(llm):
    alone = greedy(llm, "Another prompt", max_tokens=8, ignore_eos=True)["token_ids"]
    outs = llm.generate(["The river", "Another prompt"],
                        [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={77: 100}),
                         SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)], use_tqdm=False)
    assert outs[0]["token_ids"] == [77] * 8 and outs[1]["token_ids"] == alone
    sampled = llm.generate(["The river"], SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True,
                                                         logit_bias={1234: 100}), use_tqdm=False)[0]
    assert sampled["token_ids"] == [1234] * 8
    banned = greedy(llm, "The river", max_tokens=8, ignore_eos=True)["token_ids"]
    avoid = greedy(llm, "The river", max_tokens=8, ignore_eos=True, logit_bias={t: -100 for t in banned})["token_ids"]
    assert not set(avoid) & set(banned)


def hf_greedy(hf, prompt: list[int], steps: int, process) -> list[int]:
    """transformers' model, one token at a time: argmax of process(ids so far, next-token logits)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(torch.tensor([ids])).logits[0, -1].double()
            processed = process(ids, logits)
            top2 = processed.topk(2).values
            assert top2[0] - top2[1] > 1e-3, "a near tie: pick another prompt"
            ids.append(int(processed.argmax()))
    return ids[len(prompt):]


def test_repetition_penalty_matches_transformers_processor(llm, hf):
    prompt = llm.tokenizer.encode("The river runs to the sea")
    plain = greedy(llm, prompt, max_tokens=12, ignore_eos=True)["token_ids"]
    for penalty in (1.3, 2.0):
        got = greedy(llm, prompt, max_tokens=12, ignore_eos=True, repetition_penalty=penalty)["token_ids"]
        processor = RepetitionPenaltyLogitsProcessor(penalty)
        want = hf_greedy(hf, prompt, 12, lambda ids, logits: processor(torch.tensor([ids]), logits[None])[0])
        assert got == want and got != plain, penalty


@pytest.mark.parametrize("kw", [dict(presence_penalty=1.5), dict(frequency_penalty=0.7),
                                dict(presence_penalty=-0.5, frequency_penalty=1.2, repetition_penalty=1.1),
                                dict(frequency_penalty=0.4, logit_bias={292: 3.0, 1459: -3.0})])
def test_penalties_end_to_end_match_a_step_by_step_reference(llm, hf, kw):
    """Greedy through the overlapped engine (the newest token of each step is still on the device when
    the next is built) equals transformers' model with the float64 reference applied at each step."""
    prompt = llm.tokenizer.encode("The river runs to the sea")
    sp = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, **kw)
    got = llm.generate([prompt, "other rows", "in the batch"],
                       [sp] + [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)] * 2,
                       use_tqdm=False)[0]["token_ids"]

    def process(ids, logits):
        seq = Sequence(prompt, sp, 16)
        seq.token_ids = list(ids)
        return torch.from_numpy(reference_logits(logits.numpy(), seq, None))
    assert got == hf_greedy(hf, prompt, 14, process)
    assert got != greedy(llm, prompt, max_tokens=14, ignore_eos=True)["token_ids"]  # the controls did something


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_same_as_cpu_and_no_host_sync(tmp_path):
    """process_logits on CUDA: the CPU's values, and not one host sync (decode must not wait); then the
    engine on the GPU (FlashInfer, bf16, CUDA graphs, the fused sampler on processed logits)."""
    from nanovllm import LLM
    rng = random.Random(0)
    seqs, newest = [], []
    for _ in range(64):
        seq, new = make_seq(rng, random_params(rng), pending=rng.random() < 0.5)
        seqs.append(seq)
        newest.append(new if new is not None else seq.token_ids[-1])
    sampling = builder()._sampling_inputs(seqs)
    logits = torch.randn(len(seqs), VOCAB) * 4
    want = process_logits(logits, sampling, torch.tensor(newest))
    logits_gpu, newest_gpu = logits.cuda(), torch.tensor(newest).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = process_logits(logits_gpu, sampling, newest_gpu)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got.cpu()), finite)
    assert torch.allclose(got.cpu()[finite], want[finite], rtol=1e-6, atol=1e-5)
    # FlashInfer needs head_dim 64/128/256 (config.FLASHINFER_HEAD_DIMS): the tiny shape with wider heads
    model = make_model("qwen3-tiny", str(tmp_path / "m"), seed=0, dtype="bfloat16", hidden_size=256, head_dim=64)
    llm = LLM(model, device="cuda", dtype="bfloat16", max_model_len=256, max_num_seqs=16)
    try:
        eos = llm.config.eos_token_ids[0]
        outs = llm.generate(["The river", "The river", "Other"], [
            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={77: 100}),
            SamplingParams(temperature=1.0, seed=1, max_tokens=16, logit_bias={eos: 60}, min_tokens=5,
                           presence_penalty=1.0, repetition_penalty=1.2),
            SamplingParams(temperature=0.8, seed=2, max_tokens=16, ignore_eos=True, min_p=0.2, frequency_penalty=1.0)],
            use_tqdm=False)
        assert outs[0]["token_ids"] == [77] * 8
        assert outs[1]["token_ids"][5:] == [eos] and eos not in outs[1]["token_ids"][:5]
        assert len(outs[2]["token_ids"]) == 16
    finally:
        llm.close()


def test_a_row_without_pages_for_its_tokens_is_refused():
    """A scheduler bug (a sequence scheduled with fewer pages than its tokens need: session 9's lpm
    restore path, on the H200 an IndexError deep in the step builder) is a clear error naming the row."""
    seqs = []
    for n in (20, 40):
        seq = Sequence(list(range(n)), SamplingParams(), 16)
        seq.block_table = list(range(len(seqs) * 4, len(seqs) * 4 + seq.num_blocks))
        seq.chunk_len = n
        seqs.append(seq)
    builder().build(seqs, is_prefill=True)   # both rows have their pages
    seqs[1].block_table.pop()
    with pytest.raises(RuntimeError, match=r"step row 1 \(sequence \d+\) has 2 pages, its 40 tokens need 3"):
        builder().build(seqs, is_prefill=True)
