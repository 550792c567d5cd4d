#!/usr/bin/env python3
"""Writes crates/rl/tests/fixtures/math_answers/expected.json: how the MATH benchmark's grader
normalises and compares answers, which crates/rl/tests/math_answers.rs compares
whale_rl::tasks::math_answer against.

Independent implementation: lm-evaluation-harness's `hendrycks_math` task
(`lm_eval/tasks/hendrycks_math/utils.py`, Hendrycks et al.'s `is_equiv` and `strip_string` as
that harness runs them), imported from the pinned release's own file. Only its `datasets`
import is stood in for: the grader never touches it.

Recorded: `strip_string` of each case (null where it raises, as `is_equiv` then compares the
answers as written), `is_equiv` of every pair of the hand-written cases, and every character
that `strip_string` takes in front of (or behind) `5` in `5/1` without raising: which sides of
an `a/b` Python's `int()` reads decides the grader's fallback, and it reads the decimal digits of
every script and strips Unicode's whitespace, so this is its tables checked whole.

Run once from the repo root (CI never does); it needs no venv, only pip:
  pip install --no-deps --target /tmp/lm_eval_0_4_13 lm_eval==0.4.13
  python3 scripts/make_math_answer_reference.py /tmp/lm_eval_0_4_13
"""

import importlib.util
import json
import os
import random
import sys
import types
import unicodedata

from provenance import stamp

LM_EVAL = "0.4.13"
OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "rl", "tests", "fixtures", "math_answers")

# Answers as MATH writes them and as models write them, and the corners of each rewrite rule:
# \frac and \sqrt with and without braces or an argument, a/b with every kind of integer int()
# accepts or refuses, units, percent, degrees, dollars, a leading "k =", stray spaces and
# linebreaks.
HAND = [
    "\\frac{1}{2}", "\\dfrac12", "\\tfrac{1}{2}", "0.5", ".5", " .5", "{.5}", "1/2", "\\frac12",
    "\\frac1{2}", "\\frac{1}2", "\\frac1", "\\frac", "\\frac{}", "\\frac 12", "\\dfrac{\\sqrt3}{2}",
    "\\frac{\\sqrt{3}}{2}", "\\sqrt2", "\\sqrt{2}", "\\sqrt", "\\sqrt 2", "2\\sqrt3", "2 \\sqrt{3}",
    "k = 5", "k=5", "x=5", "abc=5", "5", " 5 ", "\n5\n", "5.", "a=b=c", "=5", "=", "k=", "",
    "10\\%", "10%", "10", "\\$10", "$10$", "90^\\circ", "90^{\\circ}", "90", "5 \\text{ cm}",
    "5\\text{ cm}", "5\\text{cm}", "\\text{ a}\\text{ b}", "\\left( 1, 2 \\right)", "(1,2)",
    "\\left[0,1\\right)", "[0,1)", "1\\!000", "1000", "1\\\\000", "3/4", "-3/4", "\\frac{-3}{4}",
    "03/4", "3/04", "+3/4", "-0/5", "0/5", "x/4", "3/x", "1_0/3", "10/3", "1__0/3", "_1/2", "1_/2",
    "\u0663/\u0664", "3/\u0664", "\t3/4", "3/4\t", "3 / 4", "1/2/3", "/", "3/", "/4",
    "123456789012345678901234567890/7", "\\frac{123456789012345678901234567890}{7}", "x^2+1",
    "x^{2}+1", "\\pi", "2\\pi", "\\infty", "-\\infty", "(-\\infty,0]", "\\text{(A)}", "A",
    "\\textbf{(A)}", "\\{1,2\\}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "1.5", "\\frac{3}{2}",
    "3/2", "1\u00a0/2", "\u00bd", "\u2153/3", "\x1c3/4", "\u30003/4", "3/4\x85",
    "1" * 4300 + "/7", "1" * 4301 + "/7", "1_" * 10 + "1" * 4291 + "/7",
]

# Pieces the random cases are strung from: every rule's trigger, and the characters around it.
PIECES = [
    "\\frac", "\\dfrac", "tfrac", "\\sqrt", "{", "}", "1", "2", "7", "0", "/", ".", " ", "=", "k",
    "x", "\\text{ ", "\\text{", "\\%", "%", "\\$", "$", "^\\circ", "^{\\circ}", "\\left(",
    "\\right)", "\\\\", "\\!", "\n", "-", "+", "_", "\u0663", "\t", "\\", "0.5", "\\pi", ",",
    "\x1c", "\xa0",
]


def load_grader(lm_eval_root):
    """lm_eval's hendrycks_math utils module, from its own file, without importing lm_eval."""
    sys.modules.setdefault("datasets", types.SimpleNamespace(Dataset=object))
    path = os.path.join(lm_eval_root, "lm_eval", "tasks", "hendrycks_math", "utils.py")
    spec = importlib.util.spec_from_file_location("hendrycks_math_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stripped(grader, s):
    try:
        return grader.strip_string(s)
    except Exception:
        return None


def main():
    lm_eval_root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/lm_eval_0_4_13"
    with open(os.path.join(lm_eval_root, f"lm_eval-{LM_EVAL}.dist-info", "METADATA")) as f:
        assert f"Version: {LM_EVAL}\n" in f.read(), f"{lm_eval_root} is not lm_eval {LM_EVAL}"
    grader = load_grader(lm_eval_root)

    rng = random.Random(0)
    drawn = ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 8))) for _ in range(3000)]
    cases = list(dict.fromkeys(HAND + drawn))
    pairs = ["".join("1" if grader.is_equiv(a, b) else "0" for b in HAND) for a in HAND]
    characters = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000]
    before = [ord(c) for c in characters if stripped(grader, c + "5/1") is not None]
    behind = [ord(c) for c in characters if stripped(grader, "5" + c + "/1") is not None]

    meta = stamp(__file__, [])
    meta["lm_eval"] = LM_EVAL
    meta["python"] = sys.version.split()[0]
    meta["unicodedata"] = unicodedata.unidata_version
    out = {
        "provenance": meta,
        "strip_string": [[s, stripped(grader, s)] for s in cases],
        "hand": HAND,
        "is_equiv": pairs,
        "reads_before_5": before,
        "reads_behind_5": behind,
    }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(out, f, indent=0, ensure_ascii=True)
        f.write("\n")
    raised = sum(stripped(grader, s) is None for s in cases)
    print(f"{len(cases)} cases ({raised} raise), {len(HAND)}^2 pairs, {len(before)}/{len(behind)} characters read")


if __name__ == "__main__":
    main()
