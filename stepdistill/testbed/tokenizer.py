"""A real ``CLIPTokenizer`` whose vocabulary is built from a caption list.

The testbed cannot download CLIP's 49k-token vocabulary, so it writes its own ``vocab.json`` and
``merges.txt`` in CLIP's byte-level BPE format. Every caption word gets a chain of left-to-right merges,
so each word becomes one token and any other text still tokenizes (into byte characters).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer splits letters runs, single digits and punctuation runs (openai/CLIP simple_tokenizer).
_WORD_PATTERN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.IGNORECASE)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def caption_words(captions: Iterable[str]) -> list[str]:
    """Distinct pre-tokenized words of the captions, in first-seen order."""
    seen: dict[str, None] = {}
    for caption in captions:
        for word in _WORD_PATTERN.findall(caption.lower()):
            seen.setdefault(word, None)
    return list(seen)


def write_caption_tokenizer(captions: Iterable[str], out_dir: str | Path, max_length: int = 32) -> CLIPTokenizer:
    """Write vocab.json/merges.txt for ``captions`` into ``out_dir`` and return the loaded tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_byte_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(token, len(vocab))
    merges: dict[tuple[str, str], None] = {}
    encoder = _byte_to_unicode()
    for word in caption_words(captions):
        symbols = [encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        merged = symbols[0]
        for nxt in symbols[1:]:
            merges.setdefault((merged, nxt), None)
            merged += nxt
            vocab.setdefault(merged, len(vocab))
    for special in (BOS, EOS):
        vocab.setdefault(special, len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=max_length,
                              pad_token=EOS)
    tokenizer.save_pretrained(out)
    return tokenizer
