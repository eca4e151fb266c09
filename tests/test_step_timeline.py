"""scripts/step_timeline.py end to end on the CPU: every round of a multi-round workload (W6's shape,
made tiny), with the host tier and a GPU page cap from its options; the token range passed as bench.py
passes it (w2/w3's makers need it)."""
import os
import random
import sys

from nanovllm import SamplingParams
from nanovllm.tools.make_model import make_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))


def test_step_timeline_runs_every_round(tmp_path, monkeypatch, capsys):
    import step_timeline

    import nanovllm.benchmark as benchmark
    model = make_model("qwen3-tiny", str(tmp_path / "model"), seed=0)
    tops = []

    def tiny_w6(top):   # 2 rounds of 8 prompts sharing 4 system prompts
        tops.append(top)
        rng = random.Random(0)
        systems = [[rng.randint(0, top) for _ in range(64)] for _ in range(4)]
        sp = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=3)] * 8
        return [([s + [rng.randint(0, top) for _ in range(4)] for s in systems for _ in range(2)], sp)
                for _ in range(2)]
    monkeypatch.setitem(benchmark.WORKLOADS, "w6", (tiny_w6, dict(max_model_len=128)))
    monkeypatch.setattr(sys, "argv", ["step_timeline.py", "--model", model, "--workload", "w6",
                                      "--host-kv-cache-gb", "0.01", "--num-gpu-blocks", "64"])
    step_timeline.main()
    out = capsys.readouterr().out
    assert tops and tops[0] <= 10000
    assert "w6 cascade=False: 48 tokens" in out and "16 outputs" in out   # 2 rounds x 8 requests x 3 tokens
    assert "| prefill, tokens <= " in out and "| decode, batch <=" in out
    device = out.split("Host tier on, device time a step")[1]   # the tier's step timers, read back
    assert "| decode | " in device and "| prefill, tokens <= 1024 | " in device


def test_kernel_window_times_twenty_decode_steps_of_the_run(tmp_path, monkeypatch, capsys):
    """`--kernels-at N`: the profiler window opens at the N-th decode step and closes 20 steps on; on the CPU
    there are no kernels, the window's wall time is still reported."""
    import step_timeline

    import nanovllm.benchmark as benchmark
    model = make_model("qwen3-tiny", str(tmp_path / "model"), seed=0)

    def tiny(top):   # 4 requests of 30 greedy tokens: 29 decode steps
        rng = random.Random(0)
        return ([[rng.randint(0, top) for _ in range(12)] for _ in range(4)],
                [SamplingParams(temperature=0, ignore_eos=True, max_tokens=30)] * 4)
    monkeypatch.setitem(benchmark.WORKLOADS, "w2", (tiny, dict(max_model_len=128)))
    monkeypatch.setattr(sys, "argv", ["step_timeline.py", "--model", model, "--workload", "w2", "--kernels-at", "3"])
    step_timeline.main()
    out = capsys.readouterr().out
    assert "Kernels of decode steps 3-22 (launch to launch)" in out
    assert "Decode steps, wall ms: p10 " in out and "slowest (decode step: ms, host waits ms): " in out
    wall = float(out.split("| wall | ")[1].split(" |")[0])
    assert wall > 0
    monkeypatch.setattr(sys, "argv", ["step_timeline.py", "--model", model, "--workload", "w2", "--kernels-at", "20"])
    step_timeline.main()
    assert "the run had fewer than 40 decode steps" in capsys.readouterr().out


def test_host_only_runs_the_workload_without_a_model(monkeypatch, capsys):
    """scripts/host_only.py: a whole shared-prefix generate on an executor that samples 7 for every row."""
    import host_only
    monkeypatch.setattr(sys, "argv", ["host_only.py", "--workload", "w2", "--requests", "32", "--shared", "64",
                                      "--question", "8", "--output", "40"])
    host_only.main()   # asserts every request got its 40 tokens
    out = capsys.readouterr().out
    assert "w2 host only (32 requests, 32 groups of 64 shared tokens, 40 output tokens)" in out
    assert "decode steps: " in out and "last step (every request finishes)" in out


def test_warm_up_share_runs_moved_copies_of_the_first_requests_first(tmp_path, monkeypatch, capsys):
    """`--warm-up-share F`: the first F of the requests, every id moved by one, are generated before the run
    (after bench.py's one-prompt warm-up); the run itself is the workload's, all of it."""
    import step_timeline

    import nanovllm.benchmark as benchmark
    from nanovllm import LLM
    model = make_model("qwen3-tiny", str(tmp_path / "model"), seed=0)
    rng = random.Random(0)
    prompts = [[rng.randint(0, 50) for _ in range(12)] for _ in range(8)]
    monkeypatch.setitem(benchmark.WORKLOADS, "w2", (lambda top: (prompts, [SamplingParams(
        temperature=0, ignore_eos=True, max_tokens=4)] * 8), dict(max_model_len=128)))
    calls, generate = [], LLM.generate
    monkeypatch.setattr(LLM, "generate", lambda self, p, *a, **k: calls.append(p) or generate(self, p, *a, **k))
    monkeypatch.setattr(sys, "argv", ["step_timeline.py", "--model", model, "--workload", "w2",
                                      "--warm-up-share", "0.25"])
    step_timeline.main()
    assert calls[0] == ["Benchmark: "]
    assert calls[1] == [[t + 1 for t in p] for p in prompts[:2]]   # ids <= 50: none wraps
    assert "w2 cascade=False: 32 tokens" in capsys.readouterr().out   # the run: 8 requests x 4 tokens
