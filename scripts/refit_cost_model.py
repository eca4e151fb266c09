"""Fit nanovllm/cascade/cost_model.py from a measured cascade-vs-regular grid and report how well it
predicts: the held-out errors, how often its decision matches the measured faster choice, and the
coefficients as code. No GPU: it reads the table scripts/bench_kernels.py --only cascade prints (which
calls `report` on its own samples).

    python scripts/refit_cost_model.py                                   # the stored H200 grids, session 20
    python scripts/refit_cost_model.py --table my_run.md                 # a run's printed table
    python scripts/refit_cost_model.py --table my_run.md --defaults      # cost_model's defaults on it, no fit
    python scripts/refit_cost_model.py --table claude_docs/data/s20/fresh_s20_seed20_a.md --defaults

The stored grids (STORED) are session 20's, measured with `--only cascade --distinct-caches --ragged-fa3`: each
copy of the layer in the timed graph reads its own KV cache, and fa3 shared levels run on the ragged kernel.

A table row is `| set | G x R | shared | regular ms | cascade ms | speed-up | kernel |`: G groups of R
requests sharing `shared` tokens each, every request with OWN_TOKENS of its own, page PAGE; the
plan has two levels (the shared run, the requests' own pages), so its features follow from the shape.
"""
import argparse
import dataclasses
import os
import re

import numpy as np

import torch

from nanovllm.cascade.cost_model import (REGULAR_TERMS, CascadeCostModel, CostSample, fit_cost_model, predicted,
                                         relative_errors)
from nanovllm.cascade.planner import CascadeLevel, CascadePlan

PAGE, OWN_TOKENS = 16, 256       # scripts/bench_kernels.cascade_sample's defaults
HQ, HKV = 16, 8                  # its heads (Qwen3-0.6B's)
DATA = os.path.join(os.path.dirname(__file__), "..", "claude_docs", "data")
# Session 20's four grids (scripts/bench_kernels.py --only cascade --distinct-caches --ragged-fa3 on the H200: each
# layer timed as its share of a graph of 8 copies, each copy reading its own KV cache as an engine step's layers do,
# fa3 shared levels on the ragged kernel the engine runs; the same 104 training shapes in each and 32 held-out shapes
# of its own seed): the defaults are the fit on their training rows together (416 samples).
# fresh_s20_seed20_a/b.md hold 40 more held-out shapes, measured twice. claude_docs/data/s19 holds session 19's grids
# (one cache for all 8 copies, fa3 on the paged kernel).
STORED = [os.path.join(DATA, "s20", f"grid_s20_seed{seed}.md") for seed in (19, 2, 3, 4)]
FRESH = [os.path.join(DATA, "s20", f"fresh_s20_seed20_{run}.md") for run in "ab"]
ROW = re.compile(r"\| (train|held-out) \| (\d+) x (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| ([\w-]+) \|")


def sample_of(groups: int, per: int, shared: int, regular_ms: float, cascade_ms: float, backend: str) -> CostSample:
    """The CostSample bench_kernels.cascade_sample measures at this shape: CostSample.of on the plan's two levels
    (the page ids are not needed, only each group's rows and pages)."""
    shared_pages, own_pages, rows = shared // PAGE, OWN_TOKENS // PAGE, groups * per
    i32 = lambda a: torch.tensor(a, dtype=torch.int32)  # noqa: E731
    levels = [CascadeLevel(i32(np.arange(groups + 1) * per), i32(np.arange(groups + 1) * shared_pages),
                           i32([]), i32([PAGE] * groups), causal=False),
              CascadeLevel(i32(np.arange(rows + 1)), i32(np.arange(rows + 1) * own_pages), i32([]),
                           i32([PAGE] * rows), causal=True)]
    plan = CascadePlan(torch.arange(rows), levels, rows * (shared_pages + own_pages),
                       groups * shared_pages + rows * own_pages, [groups, rows], rows)
    return CostSample.of(plan, PAGE, backend, regular_ms, cascade_ms, HQ, HKV)


def parse_table(paths) -> dict:
    """{"train": [((G, R, shared), CostSample)], "held-out": [...]} from a printed grid (or several)."""
    samples = {"train": [], "held-out": []}
    paths = [paths] if isinstance(paths, str) else paths
    for line in (line for path in paths for line in open(path)):
        m = ROW.match(line)
        if m:
            name, g, r, shared, reg, cas, backend = m.groups()
            shape = (int(g), int(r), int(shared))
            samples[name].append((shape, sample_of(*shape, float(reg), float(cas), backend)))
    if not samples["train"] and not samples["held-out"]:
        raise ValueError(f"{paths}: no table rows")
    return samples


def report(samples: dict, model=None):
    """Fit on samples["train"] (or take `model`: no fit); print each set's predictions and errors and the
    coefficients. -> the model."""
    model = model or fit_cost_model([s for _, s in samples["train"]])
    for name in ("train", "held-out"):
        rows = samples[name]
        if not rows:
            continue
        errs = relative_errors(model, [s for _, s in rows])
        print(f"\n#### {name}: predicted vs measured\n\n| groups x requests x shared | kernel | regular ms (pred) | "
              f"cascade ms (pred) | error reg / casc |\n|---|---|---|---|---|")
        agree = 0
        for (shape, s), (er, ec) in zip(rows, errs):
            pr, pc = predicted(model, s)
            agree += (pc < model.margin * pr) == (s.cascade_ms < s.regular_ms)
            print(f"| {' x '.join(map(str, shape))} | {s.backend} | {s.regular_ms:.4f} ({pr:.4f}) | {s.cascade_ms:.4f} "
                  f"({pc:.4f}) | {100 * er:.1f}% / {100 * ec:.1f}% |")
        flat = np.array(errs)
        within = int((flat.max(axis=1) <= 0.10).sum())
        print(f"\n{name}: regular error median {100 * np.median(flat[:, 0]):.1f}% max {100 * flat[:, 0].max():.1f}%; "
              f"cascade error median {100 * np.median(flat[:, 1]):.1f}% max {100 * flat[:, 1].max():.1f}%; "
              f"both within 10% on {within} of {len(rows)}; "
              f"decision agrees with the measured faster choice on {agree} of {len(rows)}")
    print("\n# cost_model.py coefficients (fitted):")
    for term in REGULAR_TERMS:
        print(f"    regular_{term}_ms: float = {getattr(model, f'regular_{term}_ms'):.4g}")
    for name, c in model.cascade.items():
        print(f"    {name!r}: LevelCosts(" + ", ".join(f"{v:.4g}" for v in dataclasses.astuple(c)) + "),")
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", nargs="+", default=STORED, help="one grid or several (fitted together)")
    p.add_argument("--defaults", action="store_true", help="report cost_model's defaults on the table, no fit")
    args = p.parse_args()
    report(parse_table(args.table), CascadeCostModel() if args.defaults else None)


if __name__ == "__main__":
    main()
