"""The provenance every reference fixture carries: the script that wrote it, an FNV-1a hash of
that script's text (crates/model/tests/fixtures.rs hashes the script in the repo the same way,
so a fixture its script would no longer write fails a test, as stale PTX does), and the
versions of the libraries it ran with."""

import importlib
import os

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def stamp(script, libraries):
    """String metadata for the fixture `script` (its `__file__`) writes, with the versions of
    `libraries` (module names)."""
    path = os.path.abspath(script)
    with open(path, "rb") as f:
        text = f.read()
    meta = {"generator": os.path.relpath(path, ROOT), "generator_fnv1a64": fnv1a64(text)}
    for name in libraries:
        meta[name] = importlib.import_module(name).__version__
    return meta
