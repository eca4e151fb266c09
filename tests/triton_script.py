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
