"""Run a Triton kernel test script on the CPU under TRITON_INTERPRET=1 (a fresh interpreter: the
variable must be set before Triton is imported), or on CUDA in this process."""
import os
import subprocess
import sys



def run_interpreted(script: str, timeout: int = 600):
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", script.format(device="cpu")], env=env, capture_output=True,
                         text=True, timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def run_on_gpu(script: str):
    exec(script.format(device="cuda"), {})


def check_graph_replays(call, M: int, w):
    """`call(x)` -> y = x @ w (w float32 [K, N] on CUDA): captured after one eager call, replays on new x
    stay within 1e-2 of max |x @ w| and equal a fresh eager call bit for bit (split-K counters zero again
    after every replay, a fixed split order)."""
    import torch
    x = torch.randn(M, w.shape[0], device="cuda").bfloat16()
    call(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call(x)
    for _ in range(3):
        x.copy_(torch.randn(M, w.shape[0], device="cuda"))
        graph.replay()
        ref = x.float() @ w
        assert (y.float() - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()
        assert torch.equal(y, call(x))

