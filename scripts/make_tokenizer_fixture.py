#!/usr/bin/env python3
"""Writes crates/model/tests/fixtures/tokenizer/{tokenizer.json,expected.json}: a small byte-level
BPE tokenizer (the kind Qwen2 / Llama-3 / DeepSeek ship) trained here with HF `tokenizers`, with
special tokens, and the ids HF's own implementation gives for a few texts, which
crates/model/tests/tokenizer.rs compares against.

Run once from the repo root (CI never does): .venv/bin/python scripts/make_tokenizer_fixture.py
"""

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "model", "tests", "fixtures", "tokenizer")
SPECIALS = ["<|endoftext|>", "<think>", "</think>", "<answer>", "</answer>"]
CORPUS = [
    "12+7=<think>2+7+0=9;1+0+0=1</think><answer>19</answer>",
    "The quick brown fox jumps over the lazy dog. Über naïve café — 数学 reasoning!",
    "def add(a, b):\n    return a + b\n",
] * 50
TEXTS = [
    "12+7=<think>2+7+0=9;1+0+0=1</think><answer>19</answer><|endoftext|>",
    "The lazy café fox: 数学!",
    "  leading spaces and\ttabs\n",
    "unseen wörds ⚡ emoji",
]


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    os.makedirs(OUT, exist_ok=True)
    tok.save(os.path.join(OUT, "tokenizer.json"))
    expected = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        expected.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"vocab_size": tok.get_vocab_size(), "eos": tok.token_to_id("<|endoftext|>"), "cases": expected}, f,
                  ensure_ascii=False, indent=1)
    print("vocab", tok.get_vocab_size(), [len(e["ids"]) for e in expected])


if __name__ == "__main__":
    main()
