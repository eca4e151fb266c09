"""Generate with nanovllm.

    python example.py                     # the shipped tiny model trained on public-domain books (CPU, seconds)
    python example.py --model PATH        # a Hugging Face checkpoint folder (e.g. Qwen3-0.6B): chat prompts
    python example.py --enable-cascade-attention
"""
import argparse

from nanovllm import LLM, SamplingParams
from nanovllm.assets import tiny_trained_path

# Openings in the style of the tiny model's corpus (nanovllm/assets/corpus/): it continues them in kind.
STORY_PROMPTS = ["Alice was beginning to get very tired of", "`Off with her head!' said the",
                 "Of Man's first disobedience, and the fruit", "ROSALIND\tI pray you,"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder; default: the shipped tiny trained model")
    parser.add_argument("--enable-cascade-attention", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    model = args.model or tiny_trained_path()
    llm = LLM(model, enable_cascade_attention=args.enable_cascade_attention, max_model_len=4096)
    if args.model is None:
        print(f"Using the shipped tiny model at {model}: 3M parameters trained for minutes on Alice in "
              f"Wonderland, As You Like It and Paradise Lost, so expect their words, not sense.\n")
        prompts = STORY_PROMPTS
    else:
        system = "You are a concise assistant. Answer in one sentence."
        questions = ["introduce yourself", "list all prime numbers within 100", "what is a KV cache?"]
        # Every chat shares the system prompt: its KV pages are computed once and shared (prefix caching),
        # and with cascade attention decode reads them once per step for the whole group.
        prompts = [llm.tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                      {"role": "user", "content": q}],
                                                     tokenize=False, add_generation_prompt=True) for q in questions]
    params = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=args.max_tokens, seed=0)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        print(f"\nPrompt: {prompt!r}\nCompletion: {out['text']!r} ({len(out['token_ids'])} tokens, "
              f"{out['num_cached_tokens']} prompt tokens from the prefix cache)")
    print(f"\nengine stats: {llm.stats}")


if __name__ == "__main__":
    main()
