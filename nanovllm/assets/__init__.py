"""Files that ship with the package: a tiny Qwen3 trained on public-domain text, and its corpus.

`tiny_trained_path()` is a Hugging Face-layout folder (config.json, model.safetensors in bf16,
tokenizer, chat template) written by scripts/train_tiny.py: 4 layers, hidden 192, head_dim 128
(FlashInfer's head size, so the GPU tests can run it), a 3,008-token vocabulary. It continues a
sentence of the corpus with real words, and its greedy paths are varied text with a median top1 -
top2 logit margin of 0.5 (random-weight checkpoints of nanovllm.tools.make_model loop on one token),
so token-for-token comparisons (cascade on vs off, GPU vs reference) check many real decisions. It
is no oracle: 1% of its greedy choices are within 0.01 (claude_docs/tiny_trained.md).

The corpus (corpus/, provenance in corpus/README.md): Alice's Adventures in Wonderland, As You
Like It and Paradise Lost. `corpus_split()` is the one definition of the held-out slice (the last
HELD_OUT_FRACTION of each text, from a line start) that training never sees and the tests score.
"""
import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
CORPUS_DIR = os.path.join(ASSETS_DIR, "corpus")
CORPUS_FILES = ("alice29.txt", "asyoulik.txt", "plrabn12.txt")
HELD_OUT_FRACTION = 0.05


def tiny_trained_path() -> str:
    """Folder of the shipped trained tiny Qwen3 (loads with LLM(path) or from_pretrained(path))."""
    return os.path.join(ASSETS_DIR, "qwen3-tiny-trained")


def corpus_texts() -> dict[str, str]:
    """File name -> text of each corpus file."""
    texts = {}
    for name in CORPUS_FILES:
        with open(os.path.join(CORPUS_DIR, name), encoding="utf-8") as f:
            texts[name] = f.read()
    return texts


def corpus_split() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): each file split at the first line start after
    1 - HELD_OUT_FRACTION of its characters."""
    train, held_out = [], []
    for text in corpus_texts().values():
        cut = text.index("\n", int(len(text) * (1 - HELD_OUT_FRACTION))) + 1
        train.append(text[:cut])
        held_out.append(text[cut:])
    return train, held_out
