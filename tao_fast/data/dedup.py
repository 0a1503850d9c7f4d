"""Text normalisation, stable hashes and near-duplicate detection (MinHash + LSH, numpy only).

`normalize` maps text to the form duplicates are judged on: NFKC, case-folded, whitespace
collapsed, and "soft" punctuation (. , ! ? ; : quotes) dropped unless it sits between two
digits ("3.5" stays one token, apart from "35"). Operators and brackets are kept: "2+3" and
"2-3" stay different prompts. normalize(normalize(t)) == normalize(t).

`near_duplicates` finds, in order, the documents whose word-3-gram Jaccard similarity to an
earlier *kept* document is >= a threshold (the first seen is kept; no chaining through dropped
ones). Candidates come from MinHash signatures (128 hash functions, `((a*x + b) mod 2^64) >> 32`
over 32-bit shingle hashes) cut into LSH bands sized so that a pair at the threshold is a
candidate with probability >= 0.995; every candidate is then checked with the *exact* Jaccard
of the two shingle sets, so the decision does not depend on MinHash noise. Only documents with
the same `guard` (the caller passes e.g. a digest of the system prompt and the numbers in the
text) are ever compared: prompts that differ in a number are never near-duplicates.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Sequence

import numpy as np

_SOFT = re.escape(".,!?;:'\"`\u2018\u2019\u201a\u201c\u201d\u201e\u00ab\u00bb\u00bf\u00a1")
_SOFT_RE = re.compile(rf"(?<!\d)[{_SOFT}]|[{_SOFT}](?!\d)")
_TOKEN_RE = re.compile(rf"\w+(?:(?<=\d)[{_SOFT}](?=\d)\w+)*|[^\w\s]")  # "3.5": one token
_DIGITS_RE = re.compile(r"\d+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio) for shingle mixing
_RECALL = 0.995  # P(a pair exactly at the threshold becomes an LSH candidate), at least
_SLACK = 0.15  # a candidate is checked exactly if its MinHash estimate >= threshold - this
_CHUNK = 1 << 15  # shingles hashed per numpy step (x num_perm x 8 bytes of scratch)


def normalize(text: str) -> str:
    """The text duplicates are judged on: NFKC, casefold, soft punctuation out, 1 space."""
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    text = _SOFT_RE.sub(" ", text)
    return " ".join(_TOKEN_RE.findall(text))


def digits(normalized: str) -> str:
    """The numbers of a normalised text, in order (part of a near-dup guard)."""
    return " ".join(_DIGITS_RE.findall(normalized))


def digest(text: str) -> bytes:
    """sha256 of the text (UTF-8): stable across runs, machines and Python versions."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def unit_fraction(text: str) -> float:
    """A stable number in [0, 1) from the text's sha256: the held-out split coordinate."""
    return int.from_bytes(digest(text)[:8], "big") / 2.0 ** 64


def rows_per_band(threshold: float, num_perm: int) -> int:
    """The longest band (fewest false candidates) that still finds a pair at the threshold
    with probability >= _RECALL."""
    for r in sorted((r for r in range(1, num_perm + 1) if num_perm % r == 0), reverse=True):
        if 1.0 - (1.0 - threshold ** r) ** (num_perm // r) >= _RECALL:
            return r
    return 1


def shingles(tokens: Sequence[str], ngram: int = 3, cache: dict | None = None) -> np.ndarray:
    """Sorted unique 32-bit hashes of the word n-grams (the whole text if shorter)."""
    cache = {} if cache is None else cache
    for t in set(tokens).difference(cache):
        cache[t] = zlib.crc32(t.encode("utf-8", "surrogatepass"))
    if not tokens:
        return np.zeros(1, np.uint64)
    h = np.fromiter(map(cache.__getitem__, tokens), dtype=np.uint64, count=len(tokens))
    n = min(ngram, len(h))
    m = len(h) - n + 1
    x = np.zeros(m, np.uint64)
    for k in range(n):  # uint64 arithmetic wraps: a polynomial hash of the n-gram
        x = x * _MIX + h[k:k + m] + np.uint64(k + 1)
    x ^= x >> np.uint64(29)
    x = (x * _MIX) >> np.uint64(32)
    return np.unique(x)


def minhash(sets: Sequence[np.ndarray], num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """[len(sets), num_perm] uint32 MinHash signatures of 32-bit shingle sets."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2 ** 63, num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2 ** 63, num_perm, dtype=np.uint64)
    sig = np.full((len(sets), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    if not sets:
        return sig
    flat = np.concatenate(sets)
    doc = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    for s in range(0, len(flat), _CHUNK):
        x, d = flat[s:s + _CHUNK], doc[s:s + _CHUNK]
        h = a[:, None] * x  # [num_perm, chunk]; uint64 wraps: multiply-add-shift hashing
        h += b[:, None]
        h >>= np.uint64(32)
        starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        rows = d[starts]  # a document may straddle two chunks: fold the partial minima
        part = np.minimum.reduceat(h.astype(np.uint32), starts, axis=1).T
        sig[rows] = np.minimum(sig[rows], part)
    return sig


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique arrays."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


def _band_keys(sig: np.ndarray, r: int, guards: Sequence[bytes] | None) -> np.ndarray:
    """[n, bands] uint64: a hash of (band index, guard, the band's r signature values). A
    collision only adds a candidate, and every candidate is checked exactly."""
    n, bands = sig.shape[0], sig.shape[1] // r
    g = np.zeros(n, np.uint64) if guards is None else np.array(
        [int.from_bytes(x[:8].ljust(8, b"\0"), "little") for x in guards], dtype=np.uint64)
    h = g[:, None] * _MIX + np.arange(1, bands + 1, dtype=np.uint64)
    for v in np.moveaxis(sig.reshape(n, bands, r).astype(np.uint64), 2, 0):
        h = (h ^ (h >> np.uint64(31)) ^ v) * _MIX
    return h


def near_duplicates(docs: Sequence[Sequence[str]], guards: Sequence[bytes] | None = None, *,
                    threshold: float = 0.9, num_perm: int = 128, ngram: int = 3, seed: int = 0,
                    max_bucket: int = 512) -> np.ndarray:
    """For each token list, the index of the earlier kept document it near-duplicates, or -1.

    `max_bucket` caps how many kept documents one LSH bucket remembers: it bounds the work on
    degenerate inputs (thousands of prompts sharing a long template) at some loss of recall.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-dup threshold must be in (0, 1], got {threshold}")
    cache: dict = {}
    sets = [shingles(t, ngram, cache) for t in docs]
    sig = minhash(sets, num_perm, seed)
    r = rows_per_band(threshold, num_perm)
    keys = _band_keys(sig, r, guards)
    buckets: dict[int, list[int]] = {}
    rep = np.full(len(docs), -1, dtype=np.int64)
    for i, row in enumerate(keys.tolist()):
        cands: set = set()
        for key in row:
            cands.update(buckets.get(key, ()))
        if cands:
            c = np.fromiter(sorted(cands), dtype=np.int64, count=len(cands))
            est = (sig[c] == sig[i]).mean(axis=1)
            for j in c[est >= threshold - _SLACK]:  # earliest kept match wins
                if jaccard(sets[i], sets[j]) >= threshold:
                    rep[i] = j
                    break
        if rep[i] < 0:
            for key in row:
                members = buckets.setdefault(key, [])
                if len(members) < max_bucket:
                    members.append(i)
    return rep
