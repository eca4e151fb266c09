"""Extract the training corpus of the shipped tiny model (nanovllm/assets/corpus/) from Brotli's sdist.

    pip download --no-deps --no-binary :all: brotli==1.2.1 -d /tmp/brotli
    python scripts/extract_corpus.py /tmp/brotli/brotli-1.2.1.tar.gz

Brotli's source distribution on PyPI ships three public-domain literary texts of the Canterbury
corpus in tests/testdata/ (see nanovllm/assets/corpus/README.md for what they are and why they are
public domain). This checks the sha256 of each source file, converts CRLF line ends to LF, drops
trailing spaces, and cuts
Project Gutenberg's own introduction from Paradise Lost (the only one of the three with Gutenberg
text in it), so what is left is the author's work alone. The output is deterministic: its sha256
is recorded in the README too.
"""
import argparse
import hashlib
import os
import tarfile

SOURCES = {  # file in tests/testdata/ -> sha256 of the file as brotli-1.2.1 ships it
    "alice29.txt": "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
    "asyoulik.txt": "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc",
    "plrabn12.txt": "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c",
}
# Paradise Lost opens with a page by Project Gutenberg (its 1992 release notes); Milton's text starts here.
MILTON_START = "Paradise Lost \n \n \n \n \nBook I"
OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "nanovllm", "assets", "corpus")


def clean(name: str, raw: bytes) -> str:
    text = raw.decode("ascii").replace("\r\n", "\n")
    if name == "plrabn12.txt":
        start = text.index(MILTON_START)
        assert "Gutenberg" in text[:start] and "Gutenberg" not in text[start:]
        text = text[start:]
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n") + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sdist", help="brotli-1.2.1.tar.gz from PyPI")
    p.add_argument("--out", default=OUT_DIR)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tarfile.open(args.sdist) as tar:
        for name, digest in SOURCES.items():
            raw = tar.extractfile(f"brotli-1.2.1/tests/testdata/{name}").read()
            got = hashlib.sha256(raw).hexdigest()
            if got != digest:
                raise SystemExit(f"{name}: sha256 {got}, expected {digest}")
            text = clean(name, raw)
            with open(os.path.join(args.out, name), "w", newline="\n") as f:
                f.write(text)
            print(f"{name}: {len(raw)} bytes in the sdist -> {len(text)} bytes, "
                  f"sha256 {hashlib.sha256(text.encode()).hexdigest()}")


if __name__ == "__main__":
    main()
