"""Train the tiny Qwen3 that ships in nanovllm/assets/qwen3-tiny-trained/, on CPU, in minutes.

    python scripts/train_tiny.py                       # writes nanovllm/assets/qwen3-tiny-trained/
    python scripts/train_tiny.py --out /tmp/t --steps 50

The corpus is nanovllm/assets/corpus/ (public-domain texts, provenance in its README) less its
held-out slice (nanovllm.assets.corpus_split). Steps:
1. a byte-level BPE (make_model's train_tokenizer) trained on the training texts;
2. transformers' own Qwen3ForCausalLM built from make_model's qwen3-tiny preset with the shapes
   below (head_dim 128 like Qwen3-0.6B, because FlashInfer's kernels are built for it), seeded;
3. AdamW on random windows of the token stream (seeded), warmup then cosine decay, float32;
4. the weights rounded to bf16 and written with make_model's save_checkpoint (config.json with a
   top-level rope_theta, generation_config.json, model.safetensors, tokenizer and chat template).
It prints the loss curve, the held-out loss against ln(vocab) (uniform guessing) and a greedy
continuation of a corpus sentence. Same seed and thread count -> the same checkpoint.

Measured (claude_docs/tiny_trained.md): 2.94M parameters; about 0.6 s a step on one free core, so the
default 1,000 steps (8 x 256 tokens, 2M tokens, about 9 epochs) take 10 minutes (19 on a busy shared
machine); training loss 8.06 -> 4.03, held-out 4.53 nats against ln(3008) = 8.01; 6.1 MB written.
Windows of 256 tokens cover the test prompts (221-261 tokens at most, with their continuations).
"""
import argparse
import math
import os
import sys
import time

import torch

from nanovllm.assets import corpus_split, tiny_trained_path
from nanovllm.tools.make_model import build_config, make_tokenizer, save_checkpoint, train_tokenizer

SHAPES = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=128, max_position_embeddings=4096)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts' tokens, one after the other with <|endoftext|> between them."""
    ids = []
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.pad_token_id]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def mean_loss(model, tokens: torch.Tensor, seq_len: int) -> float:
    """Mean next-token loss (nats) over consecutive windows of `tokens`."""
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, seq_len):
        window = tokens[start:start + seq_len + 1]
        if len(window) < 2:
            break
        logits = model(window[None, :-1]).logits[0].float()
        total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += len(window) - 1
    return total / count


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=tiny_trained_path())
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--vocab", type=int, default=3000, help="learned BPE tokens (specials come after)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="1 on a shared 2-core machine: two threads spin against other processes (4 s a step, not 0.6)")
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    train_texts, held_out_texts = corpus_split()
    lines = [line for text in train_texts for line in text.splitlines(keepends=True)]
    tokenizer = make_tokenizer(train_tokenizer(lines, args.vocab))
    max_len, tokenizer.model_max_length = tokenizer.model_max_length, 10**9  # whole books: no length warning
    train_ids = token_stream(tokenizer, train_texts)
    held_out_ids = token_stream(tokenizer, held_out_texts)
    print(f"corpus: {sum(map(len, train_texts))} training chars -> {len(train_ids)} tokens, "
          f"{sum(map(len, held_out_texts))} held-out chars -> {len(held_out_ids)} tokens; "
          f"tokenizer {len(tokenizer)} tokens ({time.time() - t0:.0f} s)")

    tokenizer.model_max_length = max_len
    config, model_cls, _, _, fields, _ = build_config("qwen3-tiny", "bfloat16", SHAPES, tokenizer=tokenizer)
    torch.manual_seed(args.seed)
    model = model_cls(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, vocab {config.vocab_size}, "
          f"uniform loss ln(vocab) = {math.log(config.vocab_size):.3f}")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq_len + 1)
    model.train()
    running = None
    for step in range(args.steps):
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = train_ids[starts[:, None] + offsets]
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts the labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  (smoothed {running:.3f})  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - t0:.0f} s", flush=True)
    train_time = time.time() - t0

    model.eval()
    model = model.to(torch.bfloat16)   # what ships; the losses below are the shipped weights'
    model.config.dtype = torch.bfloat16
    held = mean_loss(model.float(), held_out_ids, 256)
    model = model.to(torch.bfloat16)
    print(f"held-out loss {held:.3f} nats (uniform {math.log(config.vocab_size):.3f}), "
          f"trained in {train_time:.0f} s")
    save_checkpoint(model, tokenizer, args.out, rope_theta=fields["rope_theta"])
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")

    prompt = "Alice was beginning to get very tired of"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.float().generate(ids, max_new_tokens=32, do_sample=False)
    print(f"greedy: {prompt!r} -> {tokenizer.decode(out[0, ids.shape[1]:])!r}")


if __name__ == "__main__":
    sys.exit(main())
