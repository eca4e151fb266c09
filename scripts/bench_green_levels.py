"""A cascade decode layer's two levels on disjoint SM partitions (CUDA green contexts), one layer.

    python scripts/bench_green_levels.py

Session 18 measured that the shared level (fa3, compute-bound) and the per-request level (the decode
kernel, HBM-bound) do not overlap when launched on two streams: each fills every SM in turn (W3: 0.129 +
0.262 -> 0.378 ms). If the decode kernel reaches HBM's rate on part of the SMs, running the shared level
on the rest side by side would hide it. This splits the device's SMs into two disjoint green contexts
(cuDevSmResourceSplitByCount: n SMs and the remainder; a tiny C helper built here with gcc against
libcuda, since torch's GreenContext takes the first n SMs for every context) and times, for each n, the
shared level alone on n SMs, the per-request level alone on the rest, and both side by side, eager and
replayed from a CUDA graph (whether a graph keeps the partition is part of the question).
"""
import ctypes
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DT, HKV, HQ, SIDE_WS, WS, D, timed, two_level_layer  # noqa: E402

from nanovllm.cascade.flashinfer_cascade import FlashInferCascadeAttention  # noqa: E402

PAGE = 16
HELPER = r"""
#include <cuda.h>
/* Two green contexts on disjoint SMs: `first` SMs (rounded up by the driver) and the remainder.
   Returns 0 and the two streams and their SM counts, or the failing CUresult. */
int split_streams(int dev, unsigned first, void **stream_a, void **stream_b, unsigned *sms_a, unsigned *sms_b) {
  CUdevice d; CUdevResource all, part[1], rest; unsigned n = 1; CUresult r;
  CUdevResourceDesc desc_a, desc_b; CUgreenCtx ga, gb; CUstream sa, sb;
  if ((r = cuInit(0))) return r;
  if ((r = cuDeviceGet(&d, dev))) return r;
  if ((r = cuDeviceGetDevResource(d, &all, CU_DEV_RESOURCE_TYPE_SM))) return r;
  if ((r = cuDevSmResourceSplitByCount(part, &n, &all, &rest, 0, first))) return r;
  if ((r = cuDevResourceGenerateDesc(&desc_a, part, 1))) return r;
  if ((r = cuDevResourceGenerateDesc(&desc_b, &rest, 1))) return r;
  if ((r = cuGreenCtxCreate(&ga, desc_a, d, CU_GREEN_CTX_DEFAULT_STREAM))) return r;
  if ((r = cuGreenCtxCreate(&gb, desc_b, d, CU_GREEN_CTX_DEFAULT_STREAM))) return r;
  if ((r = cuGreenCtxStreamCreate(&sa, ga, CU_STREAM_NON_BLOCKING, 0))) return r;
  if ((r = cuGreenCtxStreamCreate(&sb, gb, CU_STREAM_NON_BLOCKING, 0))) return r;
  *stream_a = sa; *stream_b = sb; *sms_a = part[0].sm.smCount; *sms_b = rest.sm.smCount;
  return 0;
}
"""


def helper():
    src, lib = "/tmp/green_split.c", "/tmp/green_split.so"
    with open(src, "w") as f:
        f.write(HELPER)
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", src, "-o", lib, f"-I{cuda}/include", f"-L{cuda}/lib64/stubs",
                    "-lcuda"], check=True)
    return ctypes.CDLL(lib)


def split(lib, first):
    a, b = ctypes.c_void_p(), ctypes.c_void_p()
    na, nb = ctypes.c_uint(), ctypes.c_uint()
    rc = lib.split_streams(0, first, ctypes.byref(a), ctypes.byref(b), ctypes.byref(na), ctypes.byref(nb))
    if rc:
        raise RuntimeError(f"green context split of {first} SMs failed: CUresult {rc}")
    return (torch.cuda.ExternalStream(a.value), torch.cuda.ExternalStream(b.value), na.value, nb.value)


def on(stream, fn):
    """fn on `stream`, ordered after and before the current stream."""
    cur = torch.cuda.current_stream()
    stream.wait_stream(cur)
    with torch.cuda.stream(stream):
        fn()
    cur.wait_stream(stream)


def graphed_on(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return timed(g.replay)


def main():
    lib = helper()
    print(f"SMs: {torch.cuda.get_device_properties(0).multi_processor_count}")
    print("| shape | shared SMs / rest | shared alone | per-request alone | both, eager | both, graph | "
          "engine today (graph) |\n|---|---|---|---|---|---|---|")
    parts = {n: split(lib, n) for n in (32, 48, 64, 72, 80, 96)}
    for groups, per, shared, own in ((1, 1024, 8192, 256), (64, 16, 2048, 256), (16, 64, 2048, 256)):
        kc, vc, plan, q, backend, max_pages = two_level_layer(groups, per, shared, own, PAGE)
        today = FlashInferCascadeAttention(WS, 2, HQ, HKV, D, PAGE, DT, q.shape[0], backend="fa2",
                                           use_cuda_graph=True, max_pages=max_pages, decode_last_level=True,
                                           shared_backend=backend, shared_split_kv=False,
                                           side_stream=torch.cuda.Stream(), shared_workspace=SIDE_WS)
        today.plan(plan)
        t_today = graphed_on(lambda: today.run(q, (kc, vc)))
        ref = today.run(q, (kc, vc)).clone()
        for n, (sa, sb, na, nb) in parts.items():
            casc = FlashInferCascadeAttention(WS, 2, HQ, HKV, D, PAGE, DT, q.shape[0], backend="fa2",
                                              use_cuda_graph=True, max_pages=max_pages, decode_last_level=True,
                                              shared_backend=backend, shared_split_kv=False, side_stream=sa,
                                              shared_workspace=SIDE_WS)
            casc.plan(plan)
            shared_w, last_w = casc.active
            t_shared = timed(lambda: on(sa, lambda: casc._run_shared(shared_w, q, (kc, vc), {})))
            t_last = timed(lambda: on(sb, lambda: last_w.run(q, (kc, vc), out=casc.out, lse=casc.lse,
                                                             return_lse=True)))
            both = lambda: on(sb, lambda: casc.run(q, (kc, vc)))  # noqa: E731
            t_both = timed(both)
            diff = (casc.run(q, (kc, vc)).float() - ref.float()).abs().max().item()
            try:
                t_graph = f"{graphed_on(both):.3f}"
            except RuntimeError as e:   # capture across green contexts may be refused
                t_graph = f"failed: {str(e).splitlines()[0][:80]}"
                torch.cuda.synchronize()
            print(f"| {groups} x {per} x {shared} ({backend}) | {na} / {nb} | {t_shared:.3f} | {t_last:.3f} | "
                  f"{t_both:.3f} | {t_graph} | {t_today:.3f} (diff {diff:.1e}) |", flush=True)
        del kc, vc


if __name__ == "__main__":
    main()
