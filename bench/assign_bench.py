"""Benchmark: the assign worker's shard rewrite against the seed's approach, on one core.

Builds a synthetic shard shaped like MMC4 (v1.1: 571M images and 43B tokens over 101.2M
documents, i.e. ~5.6 images and ~425 tokens, ~20 sentences, per document, both long-tailed),
then times:

* reference: the approach of allenai/mmc4 ``compute_assignments.py`` -- json.loads every line,
  np.array, np.pad to square with 1000, lapjv, argsort, drop padding, argmax fill, json.dumps;
* ours: ``assign.rewrite.rewrite_shard`` (orjson, matrix text reused, certified shortcut).

and checks both outputs hold the same documents. Run: ``.venv/bin/python bench/assign_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from lapjv import lapjv

from assign.document import AssignOptions, assign_document
from assign.jsonline import dump_line, parse_line
from assign.rewrite import rewrite_shard

IMAGES_PER_DOC = 5.6  # 571M / 101.2M
SENTENCE_LOG_MEAN, SENTENCE_LOG_SD = 2.6, 0.9  # lognormal: mean ~20, median ~13.5, long tail
MAX_IMAGES, MAX_SENTENCES = 60, 1000
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "more",
    "other",
    "out",
    "what",
    "time",
    "up",
    "about",
    "than",
    "into",
    "only",
    "some",
    "could",
    "them",
    "see",
    "other",
]


def make_doc(rng: np.random.Generator, index: int) -> dict[str, Any]:
    n_images = min(int(rng.geometric(1 / IMAGES_PER_DOC)), MAX_IMAGES)
    n_sentences = int(np.clip(rng.lognormal(SENTENCE_LOG_MEAN, SENTENCE_LOG_SD), 1, MAX_SENTENCES))
    # CLIP ViT-L/14 cosines are float32 values around 0.2; MMC4 prints them as float64.
    sim = rng.normal(0.21, 0.04, (n_images, n_sentences)).astype(np.float32).astype(np.float64)
    words = rng.choice(WORDS, size=(n_sentences, 21))
    return {
        "text_list": [" ".join(row).capitalize() + "." for row in words],
        "url": f"http://www.example{index % 997}.com/articles/{index}.html",
        "image_info": [
            {
                "image_name": f"{int(rng.integers(1 << 48)):012x}.jpg",
                "face_detections": None,
                "matched_text_index": 0,
                "matched_sim": 0.0,
                "raw_url": f"http://www.example{index % 997}.com/images/{index}_{i}.jpg",
            }
            for i in range(n_images)
        ],
        "similarity_matrix": sim.tolist(),
        "could_have_url_duplicate": int(rng.random() < 0.03),
    }


def build_shard(path: Path, docs: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as out:
        for index in range(docs):
            out.write(json.dumps(make_doc(rng, index)) + "\n")


class Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def timed(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def reference_solve(im2txt: np.ndarray) -> list[int]:
    """The seed's base_solve + get_image_assignments, restated."""
    cost = -im2txt
    n, m = cost.shape
    if n != m:
        pad = [[0, 0], [0, n - m]] if n > m else [[0, m - n], [0, 0]]
        cost = np.pad(cost, pad, "constant", constant_values=1000)
    sol = lapjv(cost)[0]
    rows = np.arange(len(sol))
    cols = sol[rows]
    order = np.argsort(-cost[rows, cols])
    rows, cols = rows[order], cols[order]
    if n != m:
        keep = np.where(cols < m)[0] if n > m else np.where(rows < n)[0]
        rows, cols = rows[keep], cols[keep]
    chosen = {rows[k]: cols[k] for k in range(len(rows))}
    if n > m:
        for i in range(n):
            if i not in chosen:
                chosen[i] = int(np.argmax(im2txt[i]))
    return [chosen[i] for i in range(len(chosen))]


def reference_apply(doc: dict[str, Any]) -> None:
    im2txt = np.array(doc["similarity_matrix"])
    assignment = reference_solve(im2txt)
    for i, image in enumerate(doc["image_info"]):
        image["matched_text_index"] = int(assignment[i])
        image["matched_sim"] = float(im2txt[i, assignment[i]])


def run_reference(source: Path, target: Path, clock: Clock) -> None:
    with open(source) as lines:
        docs = [clock.timed("parse", json.loads, line) for line in lines]
    for doc in docs:
        clock.timed("solve", reference_apply, doc)
    text = clock.timed("serialise", lambda: "\n".join(json.dumps(d) for d in docs))
    target.write_text(text + "\n")


def profile_ours(source: Path, clock: Clock) -> None:
    """The rewriter's per-line steps, timed one by one (same calls as assign.rewrite)."""
    options = AssignOptions()
    with open(source, "rb") as lines:
        for raw in lines:
            parsed = clock.timed("parse", parse_line, raw[:-1])
            outcome = clock.timed("solve", assign_document, parsed.doc, options)
            clock.timed("serialise", dump_line, parsed, outcome.matrix_untouched)


def shares(clock: Clock, total: float) -> str:
    parts = [f"{name} {100 * s / total:.0f}%" for name, s in clock.seconds.items()]
    other = total - sum(clock.seconds.values())
    return ", ".join([*parts, f"I/O+other {100 * max(other, 0.0) / total:.0f}%"])


def same_documents(a: Path, b: Path) -> bool:
    with open(a, "rb") as left, open(b, "rb") as right:
        return all(orjson.loads(x) == orjson.loads(y) for x, y in zip(left, right, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "docs_shard_0_v2.jsonl"
        build_shard(source, args.docs, args.seed)
        docs = [orjson.loads(line) for line in source.read_bytes().splitlines()]
        images = sum(len(d["image_info"]) for d in docs)
        sentences = sum(len(d["text_list"]) for d in docs)
        print(f"shard: {args.docs} docs, {source.stat().st_size / 1e6:.1f} MB, "
              f"{images / args.docs:.2f} images/doc, {sentences / args.docs:.1f} sentences/doc, "
              f"max {max(len(d['text_list']) for d in docs)} sentences")  # fmt: skip
        del docs

        ref_clock = Clock()
        started = time.perf_counter()
        run_reference(source, work / "reference.jsonl", ref_clock)
        ref_seconds = time.perf_counter() - started

        started = time.perf_counter()
        report = rewrite_shard(source, work / "out" / "docs_shard_0_v2.jsonl", AssignOptions())
        our_seconds = time.perf_counter() - started
        our_clock = Clock()
        started = time.perf_counter()
        profile_ours(source, our_clock)
        profiled = time.perf_counter() - started

        identical = same_documents(work / "reference.jsonl", Path(report.output))
        ref_rate, our_rate = args.docs / ref_seconds, args.docs / our_seconds
        print(f"reference (json + padded lapjv): {ref_rate:9.0f} docs/s  "
              f"[{shares(ref_clock, ref_seconds)}]")  # fmt: skip
        print(f"ours (assign.rewrite_shard):     {our_rate:9.0f} docs/s  "
              f"[{shares(our_clock, profiled)}]")  # fmt: skip
        print(f"ratio: {our_rate / ref_rate:.1f}x   outputs identical: {identical}")
        if not identical:
            raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
