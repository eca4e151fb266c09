#!/usr/bin/env python3
"""All-reduce latency on one multi-GPU host: NCCL against FlashInfer's IPC kernels (CustomAllReduce).

    source .devkit/setup.sh && python scripts/bench_allreduce.py --out $OUT/allreduce.json

It starts its own processes: one per GPU (--world-size, default 2), plus one per FlashInfer JIT module
(vllm_comm, trtllm_comm) building the kernels while NCCL is measured. Rendezvous is env:// on
127.0.0.1 with a free port. NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1).

For bf16 messages of 16 KB .. 64 MB it times, per op (microseconds; the median over --runs, the max
over ranks):
  nccl eager      dist.all_reduce, --eager-ops back to back
  nccl graph      --graph-ops (56: two per layer of Qwen3-0.6B) all-reduces captured in one CUDA graph
  custom eager / custom graph   CustomAllReduce(backend="vllm") where should_use() holds
  trtllm eager / trtllm graph   CustomAllReduce(backend="trtllm"), [tokens, 1024] rows
and, for hidden 1024 and 4096, 1..256 tokens, all-reduce + residual add + RMSNorm:
  NCCL all-reduce then flashinfer.fused_add_rmsnorm, against TRT-LLM's fused kernel (one launch).
Every method is first checked against the sum of all ranks' inputs computed in fp32, and the max abs
error is printed. It prints markdown tables and writes them as JSON to --out.

Time: the whole run stays within --budget seconds (default 270), JIT builds included; those are
reported. trtllm_comm is a large module: if its build hasn't finished in time, its columns are
skipped. setup.sh saves the JIT cache to $OUT/ficache.tgz: copy it into .devkit/ and the next run
starts with the kernels built. `--jit-only` just builds them, with no time limit.
Every worker tears down in a finally: destroy_process_group runs in a daemon thread with a timeout
(it was seen hanging at exit with NCCL 2.28), then os._exit. At the end the parent kills what is left.
"""
import os

for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1"),
                     # flashinfer.fused_add_rmsnorm: the CUDA norm kernels (see nanovllm/layers/fused.py)
                     ("FLASHINFER_USE_CUDA_NORM", "1")):
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import queue as queue_mod  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KB, MB = 1 << 10, 1 << 20
SIZES = [16 * KB, 64 * KB, 256 * KB, 1 * MB, 4 * MB, 8 * MB, 16 * MB, 64 * MB]
FUSED_HIDDEN = [1024, 4096]
FUSED_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
TRTLLM_ROW = 1024       # plain trtllm all-reduce: messages as [bytes / 2048, 1024] bf16
EPS = 1e-6
JIT_MODULES = ("vllm", "trtllm")
TEARDOWN_S = 25         # reserved at the end of --budget for closing, destroying and joining

SIZE_COLUMNS = [("nccl_eager", "nccl eager us"), ("nccl_graph", "nccl graph us"),
                ("custom_eager", "custom(vllm) eager us"), ("custom_graph", "custom(vllm) graph us"),
                ("trtllm_eager", "trtllm eager us"), ("trtllm_graph", "trtllm graph us")]
FUSED_COLUMNS = [("base_eager", "nccl+add_rmsnorm eager us"), ("fused_eager", "trtllm fused eager us"),
                 ("base_graph", "nccl+add_rmsnorm graph us"), ("fused_graph", "trtllm fused graph us")]


def fmt_size(n: int) -> str:
    return f"{n // MB} MB" if n >= MB else f"{n // KB} KB"


def fmt_us(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown_tables(result: dict) -> str:
    """The result's size table and fused table, as markdown."""
    lines = ["| size | " + " | ".join(h for _, h in SIZE_COLUMNS) + " |",
             "|---|" + "---:|" * len(SIZE_COLUMNS)]
    for row in result.get("sizes", []):
        lines.append(f"| {fmt_size(row['size_bytes'])} | "
                     + " | ".join(fmt_us(row.get(k)) for k, _ in SIZE_COLUMNS) + " |")
    fused = result.get("fused", [])
    if fused:
        lines += ["", "| hidden | tokens | " + " | ".join(h for _, h in FUSED_COLUMNS) + " |",
                  "|---:|---:|" + "---:|" * len(FUSED_COLUMNS)]
        for row in fused:
            lines.append(f"| {row['hidden']} | {row['tokens']} | "
                         + " | ".join(fmt_us(row.get(k)) for k, _ in FUSED_COLUMNS) + " |")
    return "\n".join(lines)


# ---- JIT builders (separate processes, so the build overlaps the NCCL measurements) ----------------
def build_jit(name: str, status_dir: str, event):
    t0 = time.time()
    status = {"module": name, "ok": False, "seconds": None, "error": None}
    try:
        from flashinfer.jit import comm as jit_comm
        spec = jit_comm.gen_vllm_comm_module() if name == "vllm" else jit_comm.gen_trtllm_comm_module()
        status["cached"] = spec.jit_library_path.exists() if hasattr(spec, "jit_library_path") else None
        spec.build_and_load()
        status["ok"] = True
    except BaseException as e:  # report, never raise: the workers read the status
        status["error"] = f"{type(e).__name__}: {e}"[-2000:]
    status["seconds"] = round(time.time() - t0, 1)
    tmp = Path(status_dir) / f".{name}.json"
    tmp.write_text(json.dumps(status))
    tmp.rename(Path(status_dir) / f"{name}.json")
    event.set()


def read_jit_status(status_dir: str, name: str):
    p = Path(status_dir) / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


# ---- one worker per GPU ----------------------------------------------------------------------------
class Bench:
    def __init__(self, rank, cfg, t0, status_dir, events, out_q, cpu_group):
        self.rank, self.cfg, self.ws = rank, cfg, cfg["world_size"]
        self.dev = torch.device("cuda", rank)
        self.deadline = t0 + cfg["budget"] - TEARDOWN_S
        self.status_dir, self.events, self.q, self.cpu_group = status_dir, events, out_q, cpu_group
        self.cars = {}           # backend -> CustomAllReduce
        self.unavailable = {}    # backend -> reason

    # -- plumbing --
    def log(self, msg: str):
        if self.rank == 0:
            self.q.put(("log", msg))

    def cell(self, table: str, key, values: dict):
        if self.rank == 0:
            self.q.put(("cell", table, key, values))

    def note(self, msg: str):
        if self.rank == 0:
            self.q.put(("note", msg))
            self.q.put(("log", "NOTE: " + msg))

    def time_left(self) -> float:
        return self.deadline - time.time()

    def decide(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank."""
        obj = [bool(flag)]
        dist.broadcast_object_list(obj, src=0, group=self.cpu_group)
        return obj[0]

    def allgather(self, obj) -> list:
        out = [None] * self.ws
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def step(self, what: str, fn) -> bool:
        """Run fn on every rank; agree on whether it failed anywhere (failures are logged and noted)."""
        err = None
        try:
            fn()
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        errors = [f"rank {r}: {e}" for r, e in enumerate(self.allgather(err)) if e]
        if errors:
            self.note(f"{what} failed: " + "; ".join(errors)[:800])
        return not errors

    def budget_allows(self, seconds: float, what: str) -> bool:
        ok = self.decide(self.time_left() > seconds)
        if not ok:
            self.note(f"skipped {what}: time budget (--budget {self.cfg['budget']} s)")
        return ok

    # -- data and checks --
    def inputs(self, shape, dtype, seed):
        """(this rank's input, fp32 sum of every rank's input): each rank generates all ranks' inputs."""
        parts = []
        for r in range(self.ws):
            g = torch.Generator(device=self.dev).manual_seed(seed * 1009 + r)
            parts.append(torch.randn(shape, generator=g, device=self.dev, dtype=torch.float32).to(dtype))
        ref = torch.zeros(shape, device=self.dev, dtype=torch.float32)
        for p in parts:
            ref += p.float()
        return parts[self.rank], ref

    @staticmethod
    def tolerance(ref: torch.Tensor, dtype) -> float:
        rel = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}.get(dtype, 1e-6)
        return rel * max(1.0, ref.abs().max().item())

    def check(self, label: str, out: torch.Tensor, ref: torch.Tensor) -> float:
        """Max abs error against the fp32 reference (max over ranks). Logged; over the rounding
        tolerance it is flagged MISMATCH; grossly wrong (8x that, or NaN) it raises, skipping the timing."""
        err = (out.float() - ref).abs().max().item()
        worst = max(self.allgather(err))
        tol = self.tolerance(ref, out.dtype)
        status = "ok" if worst <= tol else f"MISMATCH (tolerance {tol:.2e})"
        self.log(f"  {label}: max abs err {worst:.3e} vs fp32 reference, {status}")
        if not worst <= 8 * tol:
            raise AssertionError(f"{label}: wrong result, max abs err {worst:.3e} (tolerance {tol:.2e})")
        return worst

    # -- timing --
    def timed(self, launch, ops_per_launch: int) -> float:
        """Per-op microseconds: median over runs of one launch() between CUDA events, max over ranks."""
        launch()
        torch.cuda.synchronize(self.dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(self.cfg["runs"]):
            dist.barrier(group=self.cpu_group)
            start.record()
            launch()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / ops_per_launch)
        return max(self.allgather(statistics.median(samples)))

    def eager_time(self, op) -> float:
        k = self.cfg["eager_ops"]

        def launch():
            for _ in range(k):
                op()
        return self.timed(launch, k)

    def graph_time(self, graph) -> float:
        r = self.cfg["graph_replays"]

        def launch():
            for _ in range(r):
                graph.replay()
        return self.timed(launch, r * self.cfg["graph_ops"])

    # -- JIT --
    def wait_jit(self, name: str) -> bool:
        """Wait (within the budget) for the builder of `name`; rank 0 decides for all."""
        ok, why = False, ""
        if self.rank == 0:
            t = time.time()
            self.events[name].wait(timeout=max(0.0, self.time_left() - 30))
            status = read_jit_status(self.status_dir, name)
            if status is None:
                why = f"{name}_comm JIT build still running after {time.time() - t:.0f} s of waiting"
            elif not status["ok"]:
                why = f"{name}_comm JIT build failed: {status['error']}"
            else:
                ok = True
        ok = self.decide(ok)
        if not ok:
            self.unavailable[name] = why or "JIT module unavailable"
            self.note(self.unavailable[name] + f"; {name} columns skipped")
        return ok

    def make_car(self, backend: str):
        try:
            from nanovllm.distributed.custom_all_reduce import CustomAllReduce
        except Exception as e:  # the package mid-change elsewhere: load the one file
            import importlib.util
            self.log(f"import nanovllm failed ({type(e).__name__}: {e}); loading custom_all_reduce.py by path")
            spec = importlib.util.spec_from_file_location(
                "nanovllm_custom_all_reduce", REPO / "nanovllm" / "distributed" / "custom_all_reduce.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            CustomAllReduce = module.CustomAllReduce
        t = time.time()
        car = CustomAllReduce(self.cpu_group, self.rank, self.ws, self.dev,
                              max_bytes=self.cfg["custom_max_bytes"], backend=backend)
        self.log(f"CustomAllReduce(backend={backend}) ready in {time.time() - t:.1f} s: {car}")
        if car.disabled:
            self.unavailable[backend] = car.disabled_reason
            self.note(f"CustomAllReduce(backend={backend}) disabled: {car.disabled_reason}")
            return None
        self.cars[backend] = car
        return car

    # -- sections --
    def run(self):
        cfg = self.cfg
        if self.rank == 0:
            try:
                import flashinfer
                fi_version = getattr(flashinfer, "__version__", "?")
            except Exception as e:
                fi_version = f"not importable ({type(e).__name__}: {e})"
            try:
                v = torch.cuda.nccl.version()
                nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
            except Exception:
                nccl = "?"
            self.q.put(("meta", {"device": torch.cuda.get_device_name(self.dev), "world_size": self.ws,
                                 "torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl,
                                 "flashinfer": fi_version,
                                 "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE",
                                                                        "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
                                 "config": cfg}))
        dist.all_reduce(torch.ones(1, device=self.dev))  # NCCL up before anything is timed
        torch.cuda.synchronize(self.dev)

        for size in cfg["sizes"]:
            if not self.budget_allows(15, f"nccl {fmt_size(size)}"):
                break
            self.step(f"nccl {fmt_size(size)}", lambda: self.nccl_size(size))
            torch.cuda.empty_cache()

        if cfg["custom"] and self.wait_jit("vllm") and self.make_car("vllm") is not None:
            for size in cfg["sizes"]:
                if not self.budget_allows(10, f"custom {fmt_size(size)}"):
                    break
                self.step(f"custom {fmt_size(size)}", lambda: self.custom_size("vllm", size))

        fused_cases = [(h, t) for h in FUSED_HIDDEN for t in FUSED_TOKENS] if cfg["fused"] else []
        for hidden, tokens in fused_cases:  # the NCCL baseline, while trtllm_comm may still build
            if not self.budget_allows(8, f"fused baseline {hidden}x{tokens}"):
                break
            self.step(f"nccl+add_rmsnorm {hidden}x{tokens}", lambda: self.fused_case(hidden, tokens, None))

        if cfg["trtllm"] and self.wait_jit("trtllm") and self.make_car("trtllm") is not None:
            car = self.cars["trtllm"]
            for size in cfg["sizes"]:
                if not self.budget_allows(10, f"trtllm {fmt_size(size)}"):
                    break
                self.step(f"trtllm {fmt_size(size)}", lambda: self.custom_size("trtllm", size))
            for hidden, tokens in fused_cases:
                if not self.budget_allows(6, f"trtllm fused {hidden}x{tokens}"):
                    break
                self.step(f"trtllm fused {hidden}x{tokens}", lambda: self.fused_case(hidden, tokens, car))

    def nccl_size(self, size: int):
        numel = size // 2
        x0, ref = self.inputs((numel,), torch.bfloat16, seed=size)
        self.log(f"[{fmt_size(size)}] nccl")
        x = x0.clone()
        dist.all_reduce(x)
        err_e = self.check("nccl eager", x, ref)
        t_eager = self.eager_time(lambda: dist.all_reduce(x))
        xs = [x0.clone() for _ in range(self.cfg["graph_ops"])]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for t in xs:
                dist.all_reduce(t)
        graph.replay()
        err_g = max(self.check("nccl graph (first op)", xs[0], ref), self.check("nccl graph (last op)", xs[-1], ref))
        t_graph = self.graph_time(graph)
        self.log(f"[{fmt_size(size)}] nccl eager {t_eager:.1f} us, graph {t_graph:.1f} us per op")
        self.cell("sizes", size, {"nccl_eager": t_eager, "nccl_graph": t_graph,
                                  "err_nccl_eager": err_e, "err_nccl_graph": err_g})
        del graph, xs

    def custom_size(self, backend: str, size: int):
        car = self.cars[backend]
        numel = size // 2
        shape = (numel // TRTLLM_ROW, TRTLLM_ROW) if backend == "trtllm" else (numel,)
        x0, ref = self.inputs(shape, torch.bfloat16, seed=size)
        col = "custom" if backend == "vllm" else "trtllm"
        if not car.should_use(x0):
            self.log(f"[{fmt_size(size)}] {col}: should_use() is False (max_bytes {car.max_bytes}): skipped")
            return
        out = car.all_reduce(x0)
        err_e = self.check(f"{col} eager", out, ref)
        t_eager = self.eager_time(lambda: car.all_reduce(x0))
        xs = [x0.clone() for _ in range(self.cfg["graph_ops"])]
        car.all_reduce(xs[0])  # warm-up outside the graph
        graph = torch.cuda.CUDAGraph()
        with car.capture():
            with torch.cuda.graph(graph):
                outs = [car.all_reduce(t) for t in xs]
        graph.replay()
        err_g = max(self.check(f"{col} graph (first op)", outs[0], ref),
                    self.check(f"{col} graph (last op)", outs[-1], ref))
        t_graph = self.graph_time(graph)
        self.log(f"[{fmt_size(size)}] {col} eager {t_eager:.1f} us, graph {t_graph:.1f} us per op")
        self.cell("sizes", size, {f"{col}_eager": t_eager, f"{col}_graph": t_graph,
                                  f"err_{col}_eager": err_e, f"err_{col}_graph": err_g})
        del graph, outs, xs

    def fused_case(self, hidden: int, tokens: int, car):
        """NCCL all-reduce + flashinfer.fused_add_rmsnorm (car None), or car.fused_add_rmsnorm."""
        import flashinfer
        dt = torch.bfloat16
        seed = hidden * 1000 + tokens
        x0, xsum = self.inputs((tokens, hidden), dt, seed=seed)
        g = torch.Generator(device=self.dev).manual_seed(seed + 7)  # the same on every rank
        res0 = torch.randn((tokens, hidden), generator=g, device=self.dev, dtype=torch.float32).to(dt)
        w = (1 + 0.1 * torch.randn(hidden, generator=g, device=self.dev, dtype=torch.float32)).to(dt)
        r_ref = xsum + res0.float()
        n_ref = r_ref * torch.rsqrt(r_ref.pow(2).mean(-1, keepdim=True) + EPS) * w.float()
        tag = f"[fused {hidden}x{tokens}]"

        if car is None:
            def op(x, res):
                dist.all_reduce(x)
                flashinfer.fused_add_rmsnorm(x, res, w, EPS)  # res += x; x = rmsnorm(res) * w
                return x, res
            col = "base"
        else:
            if not car.should_use_fused(x0, res0, w):
                self.log(f"{tag} trtllm fused: not applicable (max_bytes {car.max_bytes}): skipped")
                return

            def op(x, res):
                return car.fused_add_rmsnorm(x, res, w, EPS)
            col = "fused"

        x, res = x0.clone(), res0.clone()
        norm, res_out = op(x, res)
        err = max(self.check(f"{tag} {col} eager: residual", res_out, r_ref),
                  self.check(f"{tag} {col} eager: norm", norm, n_ref))
        x, res = x0.clone(), res0.clone()
        t_eager = self.eager_time(lambda: op(x, res))
        xs = [x0.clone() for _ in range(self.cfg["graph_ops"])]
        res = res0.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [op(t, res) for t in xs]
        res.copy_(res0)
        graph.replay()  # the residual accumulates over the ops: the first op's norm is the checked one
        err = max(err, self.check(f"{tag} {col} graph: first op's norm", outs[0][0], n_ref))
        t_graph = self.graph_time(graph)
        self.log(f"{tag} {col} eager {t_eager:.1f} us, graph {t_graph:.1f} us per op")
        self.cell("fused", (hidden, tokens), {f"{col}_eager": t_eager, f"{col}_graph": t_graph, f"err_{col}": err})
        del graph, outs, xs

    def close(self):
        for car in self.cars.values():
            try:
                car.close()
            except Exception as e:
                print(f"rank {self.rank}: close: {e}", file=sys.stderr)
        self.cars = {}


def _destroy_with_timeout(seconds: float):
    def destroy():
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    t = threading.Thread(target=destroy, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def worker(rank, cfg, port, t0, status_dir, events, out_q):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    rc, bench = 0, None
    try:
        torch.cuda.set_device(rank)
        timeout = datetime.timedelta(seconds=cfg["budget"] + 60)
        dist.init_process_group("nccl", init_method="env://", rank=rank, world_size=cfg["world_size"],
                                timeout=timeout, device_id=torch.device("cuda", rank))
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        bench = Bench(rank, cfg, t0, status_dir, events, out_q, cpu_group)
        bench.run()
    except BaseException as e:
        rc = 1
        out_q.put(("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"))
    finally:
        try:
            if bench is not None:
                bench.close()
            torch.cuda.synchronize()
        except BaseException:
            pass
        if not _destroy_with_timeout(10):
            print(f"rank {rank}: destroy_process_group did not return in 10 s; exiting anyway", file=sys.stderr)
        flusher = threading.Thread(target=lambda: (out_q.close(), out_q.join_thread()), daemon=True)
        flusher.start()
        flusher.join(5)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


# ---- parent ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(procs, grace: float = 5.0):
    """Terminate, then kill, the processes we started that are still alive."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.time() + grace
    for p in procs:
        p.join(max(0.0, end - time.time()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(2)


def jit_only():
    from flashinfer.jit import comm as jit_comm
    for name, gen in (("vllm", jit_comm.gen_vllm_comm_module), ("trtllm", jit_comm.gen_trtllm_comm_module)):
        t = time.time()
        gen().build_and_load()
        print(f"{name}_comm built/loaded in {time.time() - t:.1f} s", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="allreduce.json", help="JSON results (default ./allreduce.json)")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES), help="message sizes in bytes")
    ap.add_argument("--runs", type=int, default=15, help="timed runs per measurement (median)")
    ap.add_argument("--eager-ops", type=int, default=32, help="back-to-back ops per eager run")
    ap.add_argument("--graph-ops", type=int, default=56, help="all-reduces captured in one graph")
    ap.add_argument("--graph-replays", type=int, default=3, help="graph replays per timed run")
    ap.add_argument("--custom-max-bytes", type=int, default=8 * MB, help="CustomAllReduce max_bytes")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for the whole run (JIT included)")
    ap.add_argument("--no-custom", action="store_true", help="skip CustomAllReduce(backend='vllm')")
    ap.add_argument("--no-trtllm", action="store_true", help="skip the TRT-LLM kernels")
    ap.add_argument("--no-fused", action="store_true", help="skip all-reduce + add + RMSNorm")
    ap.add_argument("--jit-only", action="store_true", help="build FlashInfer's comm JIT modules and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.jit_only:
        jit_only()
        return 0
    if torch.cuda.device_count() < args.world_size:
        print(f"bench_allreduce: needs {args.world_size} CUDA devices, this machine has "
              f"{torch.cuda.device_count()}", file=sys.stderr)
        return 2
    t0 = time.time()
    cfg = {"world_size": args.world_size, "sizes": [int(s) for s in args.sizes.split(",") if s],
           "runs": args.runs, "eager_ops": args.eager_ops, "graph_ops": args.graph_ops,
           "graph_replays": args.graph_replays, "custom_max_bytes": args.custom_max_bytes,
           "budget": args.budget, "custom": not args.no_custom, "trtllm": not args.no_trtllm,
           "fused": not args.no_fused}
    ctx = mp.get_context("spawn")
    status_dir = tempfile.mkdtemp(prefix="bench_allreduce_")
    events = {name: ctx.Event() for name in JIT_MODULES}
    wanted = [n for n in JIT_MODULES if (n == "vllm" and cfg["custom"]) or (n == "trtllm" and cfg["trtllm"])]
    builders = [ctx.Process(target=build_jit, args=(n, status_dir, events[n]), name=f"jit-{n}") for n in wanted]
    for b in builders:
        b.start()
    out_q = ctx.Queue()
    port = free_port()
    workers = [ctx.Process(target=worker, args=(r, cfg, port, t0, status_dir, events, out_q), name=f"rank{r}")
               for r in range(args.world_size)]
    for w in workers:
        w.start()
    print(f"bench_allreduce: {args.world_size} ranks on 127.0.0.1:{port}, JIT builders {wanted}, "
          f"budget {args.budget:.0f} s", flush=True)

    result = {"sizes": [], "fused": [], "notes": [], "errors": [], "meta": {}}
    size_rows, fused_rows = {}, {}

    def drain(block_s: float):
        end = time.time() + block_s
        while True:
            try:
                msg = out_q.get(timeout=max(0.0, end - time.time()))
            except (queue_mod.Empty, EOFError, OSError):
                return
            kind = msg[0]
            if kind == "log":
                print(msg[1], flush=True)
            elif kind == "note":
                result["notes"].append(msg[1])
            elif kind == "error":
                result["errors"].append(msg[1])
                print("ERROR " + msg[1], flush=True)
            elif kind == "meta":
                result["meta"] = msg[1]
                print(f"device {msg[1]['device']} x{msg[1]['world_size']}, torch {msg[1]['torch']}, "
                      f"nccl {msg[1]['nccl']}, flashinfer {msg[1]['flashinfer']}", flush=True)
            elif kind == "cell":
                _, table, key, values = msg
                rows = size_rows if table == "sizes" else fused_rows
                rows.setdefault(key, {}).update(values)

    deadline = t0 + args.budget
    while any(w.is_alive() for w in workers) and time.time() < deadline:
        drain(0.5)
    if any(w.is_alive() for w in workers):
        result["errors"].append(f"workers still running at the {args.budget:.0f} s budget: killed")
        print("ERROR: workers still running at the time budget; killing them", flush=True)
    stop(workers)
    drain(0.5)
    # Let a JIT build that is still going finish within the budget (its cache then serves the next run).
    for b in builders:
        b.join(max(0.0, deadline - time.time()))
    if any(b.is_alive() for b in builders):
        result["notes"].append("a JIT build was still running at the end of the budget and was killed: "
                               "run scripts/bench_allreduce.py --jit-only once, then again")
    stop(builders)

    result["jit"] = {n: read_jit_status(status_dir, n) for n in wanted}
    for n, st in result["jit"].items():
        if st is None:
            print(f"JIT {n}_comm: did not finish", flush=True)
        else:
            print(f"JIT {n}_comm: {'ok' if st['ok'] else 'FAILED'} in {st['seconds']} s"
                  f"{' (was cached)' if st.get('cached') else ''}"
                  f"{'' if st['ok'] else ': ' + str(st['error'])[:500]}", flush=True)
    if any(st is None or not st.get("cached") for st in result["jit"].values()):
        result["notes"].append("FlashInfer JIT builds ran during this run, beside the first measurements "
                               "(CPU contention): rerun with the saved kernel cache for the cleanest numbers")
    result["sizes"] = [{"size_bytes": k, **v} for k, v in sorted(size_rows.items())]
    result["fused"] = [{"hidden": h, "tokens": t, **v} for (h, t), v in sorted(fused_rows.items())]
    result["wall_seconds"] = round(time.time() - t0, 1)
    tables = markdown_tables(result)
    result["markdown"] = tables
    print("\n" + tables + "\n", flush=True)
    for n in result["notes"]:
        print("note: " + n, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['wall_seconds']} s)", flush=True)
    return 0 if result["sizes"] and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
