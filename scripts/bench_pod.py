"""Both levels of a cascade decode layer in one kernel: FlashInfer's POD-Attention against the engine's levels.

    python scripts/bench_pod.py

A cascade decode layer today runs its shared level (fa3 or the Triton tile, on a side stream) and its
per-request level (FlashInfer's decode kernel) as two kernels, then merges them. Session 18 measured that
the two do not overlap (W3: fa3 0.129 ms + decode 0.262 -> 0.378 together): fa3 is compute-bound and takes
whole SMs, the decode kernel is bound by HBM and fills every SM. FlashInfer's BatchPODWithPagedKVCacheWrapper
(POD-Attention, arXiv 2410.18038) runs a batch prefill and a batch decode in one launch, its CTAs picking
prefill or decode work per SM so that tensor-core tiles and memory-bound tiles share each SM. Here the
shared level is POD's prefill side (each group's rows non-causally over its pages) and the per-request
level its decode side, both with their LSE, then the engine's merge. One layer, Qwen3-0.6B heads, bf16,
page 16, CUDA-graph replay, median of bench_kernels.timed's runs (ms); `max diff` is POD + merge against
the engine's cascade output.
"""
import os
import sys

import flashinfer
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DT, HKV, HQ, SIDE, SIDE_WS, WS, D, graphed, timed, two_level_layer  # noqa: E402

from nanovllm.cascade.flashinfer_cascade import FlashInferCascadeAttention  # noqa: E402

PAGE = 16
POD_WS = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")


def layer(groups, per, shared, own):
    kc, vc, plan, q, backend, max_pages = two_level_layer(groups, per, shared, own, PAGE)
    bs = q.shape[0]
    res = {}
    casc = FlashInferCascadeAttention(WS, 2, HQ, HKV, D, PAGE, DT, bs, backend="fa2", use_cuda_graph=True,
                                      max_pages=max_pages, decode_last_level=True, shared_backend=backend,
                                      shared_split_kv=False, side_stream=SIDE, shared_workspace=SIDE_WS)
    casc.plan(plan)
    res[f"engine ({backend} + decode, side stream)"] = graphed(lambda: casc.run(q, (kc, vc)))
    ref = casc.run(q, (kc, vc)).clone()
    sh, last = plan.levels
    common = dict(num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=PAGE, q_data_type=DT, kv_data_type=DT)
    pod = flashinfer.BatchPODWithPagedKVCacheWrapper(POD_WS, "NHD")
    pod.plan(sh.qo_indptr, sh.kv_indptr, sh.kv_indices, sh.kv_last_page_len,
             last.qo_indptr, last.kv_indptr, last.kv_indices, last.kv_last_page_len, **common)

    def run_pod():
        (out_p, out_d), (lse_p, lse_d) = pod.run(q, (kc, vc), q, (kc, vc), return_lse=True)
        flashinfer.merge_state_in_place(out_d, lse_d, out_p, lse_p)
        return out_d
    diff = (run_pod().float() - ref.float()).abs().max().item()
    res["POD (fa2 prefill + decode, one launch) + merge"] = graphed(run_pod)
    res["POD, eager"] = timed(run_pod)
    # Each side alone on the same kernels, for the overlap: POD's prefill kernel (fa2) and decode-as-prefill.
    for name, lv in (("shared level alone (fa2 paged)", sh), ("per-request level alone (prefill kernel, q tile 16)", last)):
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(WS, "NHD", backend="fa2")
        w.plan(lv.qo_indptr, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len, HQ, HKV, D, PAGE, causal=False,
               q_data_type=DT, kv_data_type=DT)
        res[name] = graphed(lambda: w.run(q, (kc, vc), return_lse=True))
    del kc, vc
    return res, diff


def main():
    print("| shape (groups x rows x shared, own tokens) | kernels | ms |\n|---|---|---|")
    for groups, per, shared, own in ((1, 1024, 8192, 256), (64, 16, 2048, 256), (16, 64, 2048, 256),
                                     (4, 32, 16384, 320), (8, 128, 4096, 256), (1, 256, 8192, 256)):
        res, diff = layer(groups, per, shared, own)
        name = f"{groups} x {per} x {shared}, {own}"
        for k, ms in res.items():
            print(f"| {name} | {k} | {ms:.3f} |", flush=True)
        print(f"| {name} | max diff POD vs engine | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
