"""The `nanovllm` command:

    nanovllm serve --model PATH [--port 8000] [engine options]      OpenAI-compatible server
    nanovllm generate --model PATH [options] PROMPT [PROMPT ...]     offline generation, texts to stdout
    nanovllm bench [benchmark options]                               nanovllm.benchmark.main(argv)
"""
import argparse
import json
import sys

USAGE = __doc__.split("\n", 2)[2]


def generate(argv: list[str]):
    from nanovllm.entrypoints.serve import add_engine_args, engine_kwargs
    parser = argparse.ArgumentParser(prog="nanovllm generate", description="Generate text for prompts, offline")
    parser.add_argument("--model", required=True, help="model folder (Hugging Face layout)")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default here)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_engine_args(parser)
    args = parser.parse_args(argv)

    from nanovllm.distributed.launch import run_if_worker_host
    code = run_if_worker_host(args.model, engine_kwargs(args))  # --node-rank > 0, or a torchrun rank > 0
    if code is not None:
        raise SystemExit(code)
    from nanovllm import LLM, SamplingParams
    llm = LLM(args.model, **engine_kwargs(args))
    prompts = args.prompts
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                     tokenize=False) for p in prompts]
        prompts = [llm.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    sp = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, stop=args.stop)
    outputs = llm.generate(prompts, sp, use_tqdm=False)
    for prompt, out in zip(args.prompts, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out["text"], "finish_reason": out["finish_reason"],
                              "num_tokens": len(out["token_ids"])}, ensure_ascii=False))
        else:
            print(out["text"])


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage:\n" + USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from nanovllm.entrypoints.serve import main as serve_main
        serve_main(rest)
    elif command == "generate":
        generate(rest)
    elif command == "bench":
        try:
            from nanovllm.benchmark import main as bench_main  # lazy: heavy, and not needed by the others
        except ModuleNotFoundError as e:
            if e.name != "nanovllm.benchmark":
                raise
            print("nanovllm bench: nanovllm.benchmark is not in this installation", file=sys.stderr)
            return 2
        return bench_main(rest)
    else:
        print(f"nanovllm: unknown command {command!r}\nusage:\n{USAGE}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
