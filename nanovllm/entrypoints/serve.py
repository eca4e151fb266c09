"""Start the OpenAI-compatible server:

    python -m nanovllm.entrypoints.serve --model PATH [--host 127.0.0.1] [--port 8000] [--api-key KEY]
        [--served-model-name NAME ...] [engine options: --max-num-seqs 64 --enable-cascade-attention ...]

Engine options are made from the fields of nanovllm.config.Config (one flag per field, dashes for
underscores), so the server accepts exactly what LLMEngine does and never drifts from it.

The server speaks HTTP/1.1. A connection that opens with the HTTP/2 preface (SGLang's router probes
every worker for gRPC that way) is answered in HTTP/2, GOAWAY with HTTP_1_1_REQUIRED, and closed,
instead of being parsed as a broken HTTP/1.1 request and logged as "Invalid HTTP request received".
"""
import argparse
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import MISSING, fields

from nanovllm.config import Config

_NOT_OPTIONS = {"model", "hf_config", "eos_token_ids"}
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# HTTP/2 frames (RFC 9113): our preface, an empty SETTINGS frame; then GOAWAY, last stream 0,
# error HTTP_1_1_REQUIRED (0xd): "nothing was processed, ask again over HTTP/1.1".
H2_GOAWAY = bytes.fromhex("000000" "04" "00" "00000000" "000008" "07" "00" "00000000" "00000000" "0000000d")
logger = logging.getLogger("nanovllm.server")


_ALIASES = {"host_kvcache_gb": ["--host-kv-cache-gb"]}   # the spelling of vLLM-style flags


def add_engine_args(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("engine options (nanovllm.config.Config)")
    for f in fields(Config):
        if f.name in _NOT_OPTIONS or f.default is MISSING:
            continue
        flag = "--" + f.name.replace("_", "-")
        flags = [flag] + _ALIASES.get(f.name, [])
        # default=None: only options given on the command line reach Config, the rest keep its defaults.
        if isinstance(f.default, bool):
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None,
                               help=f"(default {f.default})")
        else:
            group.add_argument(*flags, type=type(f.default), default=None, metavar=f.name.upper(),
                               help=f"(default {f.default})")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(Config)
            if f.name not in _NOT_OPTIONS and getattr(args, f.name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm serve", description="OpenAI-compatible server for nanovllm")
    parser.add_argument("--model", required=True, help="model folder (Hugging Face layout)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("NANOVLLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $NANOVLLM_API_KEY, else none)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="model name(s) clients use (default: the --model path)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(parser)
    return parser


def http1_protocol() -> type:
    """uvicorn's HTTP/1.1 protocol class, answering an HTTP/2 preface with GOAWAY (see module doc)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Http1Protocol(AutoHTTPProtocol):
        _head: bytes | None = b""   # the connection's first bytes while they may still be the preface

        def data_received(self, data: bytes):
            if self._head is not None:
                data, self._head = self._head + data, None
                n = min(len(data), len(H2_PREFACE))
                if data[:n] == H2_PREFACE[:n]:
                    if n < len(H2_PREFACE):
                        self._head = data   # wait for the rest of the preface
                        return
                    logger.debug("HTTP/2 preface from %s: answered GOAWAY(HTTP_1_1_REQUIRED)",
                                 self.transport.get_extra_info("peername"))
                    self.transport.write(H2_GOAWAY)
                    self.transport.close()
                    return
            super().data_received(data)

    return Http1Protocol


def build(model: str, served_model_names: list[str] | None = None, api_key: str | None = None, **engine_config):
    """The engine, its loop and the app (the loop starts with the app's lifespan)."""
    # Imported here so that `--help` answers without loading torch.
    from nanovllm.engine.llm_engine import LLMEngine
    from nanovllm.entrypoints.async_engine import AsyncEngine
    from nanovllm.entrypoints.openai_server import build_app
    engine = AsyncEngine(LLMEngine(model, **engine_config))
    app = build_app(engine, served_model_names or [model], api_key=api_key)
    return engine, app


# Idle keep-alive connections are closed after this many seconds. uvicorn's default, 5 s, equals httpx's
# client-side expiry (the openai client's too): a client may send on a pooled connection at the moment
# the server closes it, and gets a ReadError (seen once in CI, tests/test_fuzz_server.py, a 2-core
# machine under load). The server outlasting its clients' pools closes that race.
KEEP_ALIVE_S = 30


class ServerThread:
    """A server in a background thread on a port picked by the OS: for tests and notebooks.

    The socket is bound before the thread starts, so the port is known and nobody else can take it."""

    def __init__(self, model: str, served_model_names: list[str] | None = None, api_key: str | None = None,
                 host: str = "127.0.0.1", log_level: str = "warning", **engine_config):
        import uvicorn
        self.api_key = api_key
        self.engine, self.app = build(model, served_model_names, api_key, **engine_config)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(self.app, log_level=log_level, timeout_graceful_shutdown=5, http=http1_protocol(),
                                timeout_keep_alive=KEEP_ALIVE_S)
        self.server = graceful_server(config, self.engine)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="nanovllm-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0):
        self.engine.begin_shutdown()
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from nanovllm.distributed.launch import run_if_worker_host
    code = run_if_worker_host(args.model, engine_kwargs(args))  # --node-rank > 0, or a torchrun rank > 0
    if code is not None:
        raise SystemExit(code)
    import uvicorn
    try:
        engine, app = build(args.model, args.served_model_name, args.api_key, **engine_kwargs(args))
    except ValueError as e:  # a bad option or model folder: one line naming it (exit 2), not a traceback
        print(f"nanovllm serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, http=http1_protocol(), timeout_keep_alive=KEEP_ALIVE_S)
    try:
        graceful_server(config, engine).run()
    except KeyboardInterrupt:  # uvicorn re-raises the signal it stopped on; Ctrl-C is a clean exit (as uvicorn.run)
        pass


def graceful_server(config, engine):
    """uvicorn's server, except that SIGINT/SIGTERM first ends every live request (streams get an error
    event and [DONE]) so the connections close at once, instead of running on through the grace period
    and being cut with nothing."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.begin_shutdown()
            super().handle_exit(sig, frame)

    return GracefulServer(config)


if __name__ == "__main__":
    main()
