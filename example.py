"""Generate with nanovllm.

    python example.py                     # a built-in tiny model with RANDOM weights (text is gibberish)
    python example.py --model PATH        # a real Hugging Face checkpoint folder (e.g. Qwen3-0.6B)
    python example.py --enable-cascade-attention
"""
import argparse

from nanovllm import LLM, SamplingParams
from nanovllm.tools.make_model import default_tiny_model_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder; default: a built-in tiny random-weight model")
    parser.add_argument("--enable-cascade-attention", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    model = args.model
    if model is None:
        model = default_tiny_model_dir()
        print(f"Using the built-in tiny model at {model}: its weights are RANDOM, so its text is gibberish.\n")

    llm = LLM(model, enable_cascade_attention=args.enable_cascade_attention, max_model_len=4096)
    tokenizer = llm.tokenizer
    system = "You are a concise assistant. Answer in one sentence."
    questions = ["introduce yourself", "list all prime numbers within 100", "what is a KV cache?"]
    # Every chat shares the system prompt: its KV pages are computed once and shared (prefix caching),
    # and with cascade attention decode reads them once per step for the whole group.
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                             tokenize=False, add_generation_prompt=True) for q in questions]
    params = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=args.max_tokens)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        print(f"\nPrompt: {prompt!r}\nCompletion: {out['text']!r} ({len(out['token_ids'])} tokens, "
              f"{out['num_cached_tokens']} prompt tokens from the prefix cache)")
    print(f"\nengine stats: {llm.stats}")


if __name__ == "__main__":
    main()
