"""Serve one model from N nanovllm servers behind SGLang's cache-aware router.

    python scripts/serve_replicas.py --model PATH [--replicas 2] [--host 127.0.0.1] [--port 8000]
        [--devices 0 1] [--replica-args="--max-num-seqs 64" ...] [--router auto|smg|sglang-router]
        [--policy cache_aware] [--router-args="--cache-threshold 0.5"] [--log-dir DIR]
        [-- options for every replica: --served-model-name NAME --max-num-seqs 128 ...]

Replica i runs `python -m nanovllm.entrypoints.serve --model PATH --port P_i` on --replica-host (free
ports unless --replica-base-port), with CUDA_VISIBLE_DEVICES=devices[i] when --devices is given, the
options after `--`, then its own --replica-args. Once every replica answers /health, the router starts
on --host:--port with the replicas as workers; with --policy cache_aware it sends requests that share
a prefix (a system prompt) to the replica whose prefix cache already holds it. When the router lists
every replica as healthy, one line `ready {json}` (URLs and process ids) is printed.

Ctrl-C, SIGTERM or the death of any child stops everything: the router first, then the replicas, each
given --grace seconds before SIGKILL (of its whole process group). Each child also gets SIGTERM if this
script is killed outright (Linux), so nothing outlives it.

Routers, from PyPI: `smg` (run as `python -m smg launch`) or `sglang-router` (`python -m
sglang_router.launch_router`). Both packages install a command named `smg`, so they are run here by
module name; auto picks smg when installed.
"""
import argparse
import ctypes
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUTERS = {  # name: (module that must be importable, command before the router's options)
    "smg": ("smg", ["-m", "smg", "launch"]),
    "sglang-router": ("sglang_router", ["-m", "sglang_router.launch_router"]),
}


def pick_router(name: str) -> str | None:
    names = list(ROUTERS) if name == "auto" else [name]
    return next((n for n in names if importlib.util.find_spec(ROUTERS[n][0]) is not None), None)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 2.0):
    """The JSON body of a 200 answer, else None (not up yet, or an error)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read()) if r.status == 200 else None
    except (OSError, ValueError):
        return None


def _die_with_parent():
    """In the child before exec: SIGTERM it when this script dies, even by SIGKILL (Linux only)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Fleet:
    """The replica and router processes: each in its own session (so its process group can be ended
    whole), stopped in reverse start order."""

    def __init__(self, log_dir: str | None = None):
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        out = None
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            out = open(os.path.join(self.log_dir, f"{name}.log"), "ab")
        try:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        finally:
            if out:
                out.close()  # the child has its own copy
        self.procs.append((name, proc))
        return proc

    def dead(self) -> list[str]:
        return [f"{name} (exit {p.returncode})" for name, p in self.procs if p.poll() is not None]

    def stop(self, grace: float):
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    print(f"serve_replicas: {name} still running after {grace}s: SIGKILL", file=sys.stderr)
            _signal_group(proc, signal.SIGKILL)  # whatever is left of its group (workers it spawned)
            proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int):
    try:
        os.killpg(proc.pid, sig)  # its own session: the group id is its pid
    except (ProcessLookupError, PermissionError):
        pass


def wait_until(fleet: Fleet, what: str, ready, timeout: float):
    deadline = time.monotonic() + timeout
    while not ready():
        if fleet.dead():
            raise RuntimeError(f"while waiting for {what}: {', '.join(fleet.dead())} exited")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout:.0f}s")
        time.sleep(0.25)


def router_lists(router_url: str, urls: list[str]) -> bool:
    """Whether the router's GET /workers shows every replica healthy (both routers answer this)."""
    body = get_json(f"{router_url}/workers")
    workers = body.get("workers", []) if isinstance(body, dict) else []
    healthy = {w.get("url") for w in workers if isinstance(w, dict) and w.get("is_healthy")
               and w.get("status", "ready") == "ready"}
    return set(urls) <= healthy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s --model PATH [options] [-- options for every replica]")
    p.add_argument("--model", required=True)
    p.add_argument("--replicas", type=int, default=None, help="default: one per --devices entry, else 2")
    p.add_argument("--host", default="127.0.0.1", help="router address")
    p.add_argument("--port", type=int, default=8000, help="router port (0: a free one)")
    p.add_argument("--replica-host", default="127.0.0.1")
    p.add_argument("--replica-base-port", type=int, default=0, help="ports P, P+1, ... (default: free ports)")
    p.add_argument("--devices", nargs="+", default=None,
                   help="CUDA_VISIBLE_DEVICES of each replica, e.g. --devices 0 1 or --devices 0,1 2,3")
    p.add_argument("--replica-args", action="append", default=[],
                   help="options for one replica, in order: --replica-args=\"--max-num-seqs 64\" (repeat)")
    p.add_argument("--router", default="auto", choices=["auto", *ROUTERS])
    p.add_argument("--policy", default="cache_aware")
    p.add_argument("--router-args", default="", help="more router options, one string")
    p.add_argument("--router-metrics-port", type=int, default=0,
                   help="the router's Prometheus port, on 127.0.0.1 (0: a free one; routers default to 29000)")
    p.add_argument("--log-dir", default=None, help="write each process's output to DIR/NAME.log")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for replicas and router")
    p.add_argument("--grace", type=float, default=10, help="seconds each process gets to stop on SIGTERM")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    n = args.replicas or (len(args.devices) if args.devices else 2)
    if n < 1 or (args.devices and len(args.devices) != n) or len(args.replica_args) > n:
        sys.exit("serve_replicas: need --replicas >= 1, one --devices entry per replica, at most one "
                 "--replica-args per replica")
    router = pick_router(args.router)
    if router is None:
        sys.exit(f"serve_replicas: no router installed ({args.router}): pip install smg")

    fleet = Fleet(args.log_dir)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`cmd &`)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the finally below
    try:
        urls = []
        for i in range(n):
            port = args.replica_base_port + i if args.replica_base_port else free_port(args.replica_host)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
            if args.devices:
                env["CUDA_VISIBLE_DEVICES"] = args.devices[i]
            own = shlex.split(args.replica_args[i]) if i < len(args.replica_args) else []
            fleet.start(f"replica{i}", [sys.executable, "-m", "nanovllm.entrypoints.serve", "--model", args.model,
                                        "--host", args.replica_host, "--port", str(port), "--log-level", "warning",
                                        *common, *own], env)
            urls.append(f"http://{args.replica_host}:{port}")
        for url in urls:
            wait_until(fleet, url, lambda: get_json(f"{url}/health") is not None, args.timeout)

        port = args.port or free_port(args.host)
        metrics_port = args.router_metrics_port or free_port("127.0.0.1")
        fleet.start("router", [sys.executable, *ROUTERS[router][1], "--worker-urls", *urls, "--policy", args.policy,
                               "--host", args.host, "--port", str(port), "--prometheus-host", "127.0.0.1",
                               "--prometheus-port", str(metrics_port), *shlex.split(args.router_args)])
        router_url = f"http://{args.host}:{port}"
        wait_until(fleet, f"router {router} with {n} replicas", lambda: router_lists(router_url, urls), args.timeout)
        pids = {name: p.pid for name, p in fleet.procs}
        print("ready " + json.dumps({"router": router_url, "router_kind": router, "replicas": urls,
                                     "pids": pids}), flush=True)
        while not fleet.dead():
            time.sleep(0.5)
        print(f"serve_replicas: {', '.join(fleet.dead())} exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:
        print(f"serve_replicas: {e}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the teardown short
            signal.signal(sig, signal.SIG_IGN)
        fleet.stop(args.grace)


if __name__ == "__main__":
    sys.exit(main())
