#!/usr/bin/env python3
"""Writes crates/model/tests/fixtures/tokenizer*/{tokenizer.json,expected.json}: small byte-level
BPE tokenizers trained here with HF `tokenizers`, and the ids HF's own implementation (its Python
binding, oniguruma regexes) gives for a few texts, which crates/model/tests/tokenizer.rs compares
against (the Rust crate, fancy-regex). Three pipelines: GPT-2's (ByteLevel with its regex),
Qwen2's (NFC, a Split on Qwen2's regex, ByteLevel without one; `<think>` an added, non-special
token, as R1-Distill-Qwen has it) and Llama-3's (its regex, digits in threes, ignore_merges).

Run once from the repo root (CI never does): .venv/bin/python scripts/make_tokenizer_fixture.py
"""

import json
import os

from provenance import stamp
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "crates", "model", "tests", "fixtures")
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LLAMA3_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
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
    "12345 + 2024 = 14369, 1234567",
    "It'S they'll WE'VE don't",
    "\r\n\n \t x  \n",
    "non\u00a0breaking\u3000space 数学推理 🙂🙂 e\u0301té",
    "trailing spaces   ",
]


def gpt2():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok, SPECIALS


def split_then_bytes(regex):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def qwen2():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = split_then_bytes(QWEN2_SPLIT)
    return tok, ["<|endoftext|>", "<answer>", "</answer>"]


def llama3():
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = split_then_bytes(LLAMA3_SPLIT)
    return tok, SPECIALS


def write(name, build):
    tok, specials = build()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    if name == "tokenizer_qwen2":
        # R1-Distill-Qwen's reasoning tags: added tokens, not special ones.
        tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                        AddedToken("</think>", special=False, normalized=False)])
    out = os.path.join(FIXTURES, name)
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    expected = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        expected.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    with open(os.path.join(out, "expected.json"), "w") as f:
        record = {"vocab_size": tok.get_vocab_size(), "eos": tok.token_to_id("<|endoftext|>"), "cases": expected}
        record["provenance"] = stamp(__file__, ["tokenizers"])
        json.dump(record, f, ensure_ascii=False, indent=1)
    print(name, "vocab", tok.get_vocab_size(), [len(e["ids"]) for e in expected])


def main():
    write("tokenizer", gpt2)
    write("tokenizer_qwen2", qwen2)
    write("tokenizer_llama3", llama3)


if __name__ == "__main__":
    main()
