"""Tensor parallelism on CPU (gloo): the same logits and tokens as one rank, workers that fail loudly
and leave nothing behind, two "nodes" on loopback, and bad configs refused before any process starts."""
import dataclasses
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from nanovllm import LLM, SamplingParams
from nanovllm.distributed.executor import WorkerError, free_port
from conftest import assert_no_leaks

PROMPTS = [[(7 * i + j * 13) % 1900 for j in range(n)] for i, n in enumerate([5, 17, 33, 64, 100, 129])]


def children() -> list[int]:
    """Live (not zombie) descendants of this process, from /proc, but multiprocessing's resource
    tracker (one per process, for good)."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    tracker = b"resource_tracker" in f.read()
            except OSError:
                continue
            if fields[0] != "Z" and not tracker:
                parent_of[int(entry)] = int(fields[1])
    found, frontier = [], {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parent_of.items() if ppid in frontier}
        found += frontier
    return found


def wait_for_no_children(timeout_s: float = 15.0) -> list[int]:
    """children(), once they are gone or timeout_s has passed."""
    deadline = time.monotonic() + timeout_s
    while children() and time.monotonic() < deadline:
        time.sleep(0.1)
    return children()


@pytest.fixture
def tp_llm():
    """Build tensor-parallel LLMs; after the test each is closed, with every page free and no
    worker process left."""
    made = []

    def make(model, tp, **kwargs):
        kwargs.setdefault("max_model_len", 1024)
        kwargs.setdefault("max_num_seqs", 64)
        llm = LLM(model, tensor_parallel_size=tp, **kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        if llm.executor.failure is None:
            assert_no_leaks(llm)
        llm.close()
    left = wait_for_no_children(10)
    assert not left, f"processes left behind: {left}"


def logits_by_step(llm, token_lists, decode_steps=4):
    """Teacher-forced greedy run through the executor (every rank runs each step); per request, the
    logits of each step that sampled for it."""
    seqs = [llm.add_request(t, SamplingParams(temperature=0, max_tokens=decode_steps + 1, ignore_eos=True))
            for t in token_lists]
    rows = {s.seq_id: [] for s in seqs}
    while not llm.is_finished():
        batch, is_prefill = llm.scheduler.schedule()
        step, batch = llm.step_builder.build(batch, is_prefill)
        step = dataclasses.replace(step, want_logits=True)
        result = llm.executor.collect(llm.executor.execute(step))
        samples = llm.launched(batch)
        for s, sampled, row in zip(batch, samples, result.logits):
            if sampled:
                rows[s.seq_id].append(row)
        llm.postprocess(batch, result.token_ids, samples)
    return [(s, torch.stack(rows[s.seq_id])) for s in seqs]


@pytest.mark.parametrize("preset,tp", [("qwen3-tiny", 2), ("qwen3-tiny", 4), ("qwen3-tiny-hd", 2), ("qwen2-tiny", 2)])
def test_logits_match_one_rank_and_transformers(model_dirs, make_llm, tp_llm, preset, tp):
    """qwen3-tiny: 4 heads, 2 KV heads (tp=4 replicates KV heads); -hd: 1 KV head, separate LM head;
    qwen2: q/k/v biases."""
    path = model_dirs[preset]
    one = logits_by_step(make_llm(path), PROMPTS[:4])
    many = logits_by_step(tp_llm(path, tp), PROMPTS[:4])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for (seq, ours), (seq1, single) in zip(many, one):
        assert seq.token_ids == seq1.token_ids
        assert (ours - single).abs().max().item() <= 1e-4
        with torch.no_grad():
            theirs = hf(torch.tensor([seq.token_ids])).logits[0]
        n = seq.num_prompt_tokens
        assert (ours - theirs[n - 1:n - 1 + len(ours)]).abs().max().item() <= 1e-4


def test_steps_in_two_pieces_equal_one_rank(tiny_model, make_llm, tp_llm, monkeypatch):
    """A step's rows through the layers as two pieces, one piece's sums over ranks started while the other
    computes (models/tp_overlap.py; made to split these small steps, prefill and decode; prefill steps without
    cascade levels between requests, each piece attending apart): the logits of one rank within 1e-4, and greedy
    generate's tokens with cascade, prefix hits and chunked prefill."""
    from nanovllm.models import tp_overlap
    monkeypatch.setenv("NANOVLLM_TP_PREFILL_PIECE_BYTES", "256")   # read by the workers as they import it
    monkeypatch.setattr(tp_overlap, "MIN_PIECE_BYTES", 256)
    rows, apart, forward = [], [], tp_overlap.forward_in_pieces
    monkeypatch.setattr(tp_overlap, "forward_in_pieces", lambda model, hidden, positions, split, own=False:
                        rows.append(len(hidden)) or apart.append(own) or forward(model, hidden, positions, split, own))
    engine = dict(enable_cascade_attention=True, max_num_batched_tokens=256)
    single, llm = make_llm(tiny_model, **engine), tp_llm(tiny_model, 2, **engine)
    assert llm.model_runner.model.model.in_pieces
    one, many = logits_by_step(single, PROMPTS), logits_by_step(llm, PROMPTS)
    assert max(rows) == 256 and min(rows) == len(PROMPTS)   # prefill steps (a full budget) and decode steps
    # prefill steps of several requests cut between them, each piece attending apart; the others cut in half
    assert any(apart) and not all(apart)
    for (seq, ours), (seq1, ref) in zip(many, one):
        assert seq.token_ids == seq1.token_ids
        assert (ours - ref).abs().max().item() <= 1e-4
    prompts = shared_prompt_workload()
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    got = llm.generate(prompts, sp, use_tqdm=False)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in single.generate(prompts, sp, use_tqdm=False)]
    assert llm.stats["cascade_steps"] > 0 and sum(o["num_cached_tokens"] for o in got) > 0


def test_pieces_switch(monkeypatch):
    from nanovllm.models import tp_overlap
    monkeypatch.setattr(tp_overlap, "tp_size", lambda: 2)
    deferred = [type("Layer", (), {"attn_partial": True, "mlp_partial": True})()] * 2
    assert tp_overlap.enabled(deferred)
    assert not tp_overlap.enabled(deferred + [type("Moe", (), {"attn_partial": True, "mlp_partial": False})()])
    monkeypatch.setenv("NANOVLLM_TP_PREFILL_OVERLAP", "0")
    assert not tp_overlap.enabled(deferred)
    monkeypatch.setenv("NANOVLLM_TP_PREFILL_OVERLAP", "yes")
    with pytest.raises(ValueError, match="NANOVLLM_TP_PREFILL_OVERLAP"):
        tp_overlap.enabled(deferred)
    monkeypatch.setattr(tp_overlap, "tp_size", lambda: 1)
    monkeypatch.setenv("NANOVLLM_TP_PREFILL_OVERLAP", "1")
    assert not tp_overlap.enabled(deferred)


def shared_prompt_workload(seed=0):
    rng = random.Random(seed)
    prompts = []
    for sys_len, members in ((80, 5), (300, 6), (40, 3)):
        system = [rng.randrange(1900) for _ in range(sys_len)]
        prompts += [system + [rng.randrange(1900) for _ in range(rng.randrange(3, 40))] for _ in range(members)]
    rng.shuffle(prompts)
    return prompts


@pytest.mark.parametrize("tp", [2, 4])
def test_greedy_generate_equals_one_rank(tiny_model, make_llm, tp_llm, tp):
    """Cascade on, prefix hits, chunked prefill (a 96-token budget) and preemption (40 pages)."""
    prompts = shared_prompt_workload()
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = dict(enable_cascade_attention=True, max_num_batched_tokens=96, num_kvcache_blocks=40)
    single = make_llm(tiny_model, **engine)
    expected = single.generate(prompts, sp, use_tqdm=False)
    llm = tp_llm(tiny_model, tp, **engine)
    layers = llm.model_runner.model.model.layers   # rank 0's: sums over ranks taken in the norms (deferred)
    assert all(layer.attn_partial and layer.mlp_partial for layer in layers)
    got = llm.generate(prompts, sp, use_tqdm=False)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in expected]
    assert llm.stats["cascade_steps"] > 0
    assert llm.scheduler.num_preemptions > 0
    assert sum(o["num_cached_tokens"] for o in got) > 0
    assert llm.stats["prefill_steps"] > 1
    # seeded sampling is the same on every rank and the same as one rank's
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)
    assert (llm.generate(PROMPTS[:3], seeded, use_tqdm=False)[1]["token_ids"]
            == single.generate(PROMPTS[:3], seeded, use_tqdm=False)[1]["token_ids"])


def test_sampling_controls_equal_one_rank(tiny_model, make_llm, tp_llm):
    """Penalties, logit_bias, min_tokens and min_p: every rank applies them to the same full logits,
    so a TP=2 run gives one rank's tokens (greedy and seeded rows, with plain rows in the batch)."""
    single = make_llm(tiny_model)
    eos = single.config.eos_token_ids[0]
    controls = [
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5,
                       frequency_penalty=0.3, logit_bias={77: 2.0}),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=3, max_tokens=16, min_p=0.1, frequency_penalty=1.0, min_tokens=8,
                       logit_bias={eos: 8.0}),
        SamplingParams(temperature=0, max_tokens=16, repetition_penalty=0.7, min_tokens=4, logit_bias={eos: 50.0}),
    ]
    expected = single.generate(PROMPTS[:4], controls, use_tqdm=False)
    got = tp_llm(tiny_model, 2).generate(PROMPTS[:4], controls, use_tqdm=False)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in expected]
    assert len(got[3]["token_ids"]) == 5 and got[3]["token_ids"][-1] == eos  # EOS right after min_tokens


def test_killed_worker_gives_rank0_an_error(tiny_model, tp_llm):
    llm = tp_llm(tiny_model, 2)
    rank, proc = llm.executor.procs[0]
    sp = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True)
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # serving
    import threading
    threading.Timer(0.5, lambda: os.kill(proc.pid, 9)).start()
    start = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1.*died"):
        llm.generate(PROMPTS, sp, use_tqdm=False)
    assert time.monotonic() - start < 10
    with pytest.raises(WorkerError):  # the engine stays failed, with the same error
        llm.generate(PROMPTS[:1], sp, use_tqdm=False)


def test_worker_exception_carries_its_traceback(tiny_model, tp_llm, monkeypatch):
    monkeypatch.setenv("NANOVLLM_WORKER_FAULT", "1:5")  # rank 1 raises at step 5 (read by the worker)
    llm = tp_llm(tiny_model, 2)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"(?s)rank 1 failed:.*Traceback.*injected fault at step 5"):
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)
    assert time.monotonic() - start < 10


def test_two_nodes_on_loopback(tiny_model, make_llm, tp_llm):
    """tp=4 over two "nodes" of 2 ranks: node 1 is `nanovllm serve --node-rank 1` in another process."""
    port = free_port()
    common = ["--model", tiny_model, "--tensor-parallel-size", "4", "--nnodes", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(port), "--max-model-len", "1024", "--max-num-seqs", "64",
              "--distributed-timeout-s", "60"]
    node1 = subprocess.Popen([sys.executable, "-m", "nanovllm.cli", "serve", *common, "--node-rank", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        llm = tp_llm(tiny_model, 4, nnodes=2, node_rank=0, master_addr="127.0.0.1", master_port=port,
                     distributed_timeout_s=60)
        sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        got = llm.generate(PROMPTS, sp, use_tqdm=False)
        expected = make_llm(tiny_model).generate(PROMPTS, sp, use_tqdm=False)
        assert [o["token_ids"] for o in got] == [o["token_ids"] for o in expected]
        llm.close()
        assert node1.wait(timeout=20) == 0, node1.stdout.read().decode()[-2000:]
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()


def test_unknown_all_reduce_backend_is_refused_before_any_process(tiny_model, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CUSTOM_AR_BACKEND", "nccl")
    with pytest.raises(ValueError, match="NANOVLLM_CUSTOM_AR_BACKEND='nccl' must be one of"):
        LLM(tiny_model, tensor_parallel_size=2)
    assert not children()


@pytest.mark.parametrize("kwargs,match", [
    (dict(tensor_parallel_size=3), "does not divide the 4 attention heads"),
    (dict(tensor_parallel_size=8), "does not divide the 4 attention heads"),
    (dict(tensor_parallel_size=2, device="cuda", dtype="bfloat16"), "GPUs per node"),
    (dict(tensor_parallel_size=4, nnodes=3), "nnodes=3"),
    (dict(tensor_parallel_size=4, nnodes=2, node_rank=2, master_port=29500), "node_rank=2"),
    (dict(tensor_parallel_size=4, nnodes=2), "master-port"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be"),
])
def test_bad_parallel_config_is_refused_before_any_process(tiny_model, kwargs, match):
    if kwargs.get("device") == "cuda" and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    with pytest.raises(ValueError, match=match):
        LLM(tiny_model, **kwargs)
    assert not children()


def test_torchrun_launch(tiny_model):
    """Every rank started by torchrun (env:// rendezvous, steps over the gloo channel): the same text
    as one process."""
    args = ["-m", "nanovllm.cli", "generate", "--model", tiny_model, "--max-tokens", "8", "--max-model-len", "512",
            "Hello there", "The river"]
    single = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", str(free_port()), *args, "--tensor-parallel-size", "2"],
                              capture_output=True, text=True, timeout=180)
    assert torchrun.returncode == 0, torchrun.stderr[-2000:]
    assert torchrun.stdout == single.stdout and single.stdout.count("\n") == 2


def test_server_reports_a_failed_worker_and_stops_clean(tiny_model):
    """TP=2 behind the HTTP server: a killed worker makes /health 503 and requests fail with the error
    (the server itself keeps answering); stopping the server leaves no process behind."""
    import httpx

    from nanovllm.entrypoints.serve import ServerThread
    server = ServerThread(tiny_model, ["tiny"], tensor_parallel_size=2, max_model_len=512, max_num_seqs=16).start()
    try:
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.post("/v1/completions", json=body).status_code == 200
            assert client.get("/health").status_code == 200
            rank, proc = server.engine.engine.executor.procs[0]
            os.kill(proc.pid, 9)
            proc.join(10)
            reply = client.post("/v1/completions", json=body)
            assert reply.status_code >= 500 and "rank 1" in reply.text
            health = client.get("/health")
            assert health.status_code == 503 and "rank 1" in health.text
            again = client.post("/v1/completions", json=body)
            assert again.status_code == 503 and "rank 1" in again.text
    finally:
        server.stop()
    assert not children()


def test_ranks_must_share_the_piece_settings(monkeypatch):
    """Ranks that resolved the pieces' switches differently would pair different collectives: every rank
    raises, naming the switch and each rank's value."""
    from types import SimpleNamespace

    from nanovllm.distributed import parallel_state as ps
    from nanovllm.models import tp_overlap
    mine = tp_overlap.settings()
    theirs = [dict(mine)]
    monkeypatch.setattr(ps, "_group", SimpleNamespace(size=2, cpu_group=None))
    monkeypatch.setattr(ps.dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(
        slice(None), [obj] + theirs))
    ps.check_same_on_every_rank(mine)   # alike: nothing raised
    theirs[0]["NANOVLLM_TP_PIECES_ATTEND_APART"] = not mine["NANOVLLM_TP_PIECES_ATTEND_APART"]
    with pytest.raises(ValueError, match="disagree on NANOVLLM_TP_PIECES_ATTEND_APART .*rank 1"):
        ps.check_same_on_every_rank(mine)


@pytest.mark.parametrize("failed", [False, True])
def test_leaving_after_a_failure_frees_no_ipc_buffers(monkeypatch, failed):
    """After a rank failed, this rank's streams may wait for ever on the dead peer: closing the IPC all-reduces
    (a device synchronize, then a barrier) would not return, so their buffers are left to the process's exit."""
    from types import SimpleNamespace

    from nanovllm.distributed import parallel_state as ps
    closed = []
    ars = [SimpleNamespace(close=lambda name=name: closed.append(name)) for name in ("custom", "copy engine")]
    monkeypatch.setattr(ps, "_group", SimpleNamespace(custom_ar=ars[0], ce_ar=ars[1]))
    monkeypatch.setattr(ps.dist, "is_initialized", lambda: False)
    ps.destroy_tensor_parallel(failed=failed)
    assert ps.group() is None
    assert closed == ([] if failed else ["custom", "copy engine"])
