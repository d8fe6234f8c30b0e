"""Export benchmark: `mmc4-crawl export` against the plain loop, in documents/s and MB/s.

    .venv/bin/python bench/export_bench.py       (or: make bench-dataset)

The corpus: synthetic MMC4-shaped shards (default 4 × 1,000 documents, 1-5 images each, 80 %
stored, JPEGs of ~50 kB) with their status reports and dataset index. Both sides write the
OpenFlamingo layout (``image_info[i].image_base64``) of every document, with its stored
images, into tars of 1,000 documents:

- the plain loop (the shape of OpenFlamingo's converter, without its JPEG re-encoding): one
  process reads each shard line by line, ``json.loads``, reads each stored image, base64,
  ``json.dumps``, and adds the sample to a tar (``tarfile``);
- ours: ``crawler.dataset.export.export`` (one process per CPU).

Runs alternate, best of three each; files are in the page cache after the first run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _corpus import make_corpus

from assign.status import load_stored_images
from core import status
from crawler.dataset.export import export
from crawler.dataset.exportjob import ExportSettings

ROOT = Path(__file__).resolve().parent.parent


def plain_loop(output: Path, shards: list[str], out: Path) -> tuple[int, int]:
    """(documents, bytes written)."""
    out.mkdir(parents=True)
    docs = written = 0
    for shard in shards:
        stored = load_stored_images(status.ReportPaths(output, shard).report, images_dir=output)
        tar_no = 0
        in_tar = 0
        tar = tarfile.open(out / f"{shard}-{tar_no:06d}.tar", "w")  # noqa: SIM115
        with open(output / status.SHARDS_DIR / f"{shard}.jsonl", "rb") as lines:
            for i, line in enumerate(lines):
                doc = json.loads(line)
                for info in doc["image_info"]:
                    image = stored.get(info["image_name"])
                    if image is None:
                        continue
                    with open(image.local_path, "rb") as f:
                        info["image_base64"] = base64.b64encode(f.read()).decode()
                data = json.dumps(doc).encode()
                member = tarfile.TarInfo(f"{shard}-{i:09d}.json")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
                docs += 1
                in_tar += 1
                if in_tar == 1000:
                    tar.close()
                    tar_no += 1
                    in_tar = 0
                    tar = tarfile.open(out / f"{shard}-{tar_no:06d}.tar", "w")  # noqa: SIM115
        tar.close()
    written = sum(p.stat().st_size for p in out.glob("*.tar"))
    return docs, written


def ours(output: Path, out: Path, processes: int) -> tuple[int, int]:
    settings = ExportSettings(out=str(out), layout="base64", min_stored=0, max_docs=1000)
    summary = export(str(output), settings, processes=processes, progress=False)
    assert not summary.errors, summary.errors
    return summary.docs, summary.bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=0, help="ours: 0 = one per CPU")
    parser.add_argument("--work", type=Path, default=ROOT / "bench_data" / "dataset")
    args = parser.parse_args()

    output = args.work / f"export_{args.docs}"
    if not (output / "_complete").exists():
        shutil.rmtree(output, ignore_errors=True)
        print(f"building a {args.docs:,}-document corpus in {output} ...", flush=True)
        make_corpus(output, args.docs, args.per_shard, with_images=True, seed=9)
        (output / "_complete").touch()
    shards = sorted(p.name[: -len(".jsonl")] for p in (output / status.SHARDS_DIR).glob("*.jsonl"))
    target = args.work / "export_out"
    best: dict[str, tuple[float, int, int]] = {}
    for _ in range(args.runs):
        for name in ("plain loop", "ours"):
            shutil.rmtree(target, ignore_errors=True)
            started = time.perf_counter()
            if name == "ours":
                docs, nbytes = ours(output, target, args.processes)
            else:
                docs, nbytes = plain_loop(output, shards, target)
            elapsed = time.perf_counter() - started
            if name not in best or elapsed < best[name][0]:
                best[name] = (elapsed, docs, nbytes)
    shutil.rmtree(target, ignore_errors=True)
    images = sum(
        len(load_stored_images(status.ReportPaths(output, s).report, None)) for s in shards
    )
    print(f"{args.docs:,} documents in {len(shards)} shards, {images:,} stored images; "
          f"OpenFlamingo layout (base64), best of {args.runs} runs each, in turns")  # fmt: skip
    rates = {}
    for name, (elapsed, docs, nbytes) in best.items():
        rates[name] = (docs / elapsed, nbytes / elapsed / 1e6)
        print(f"  {name:11s} {docs / elapsed:8.0f} docs/s  {nbytes / elapsed / 1e6:7.1f} MB/s  "
              f"({docs:,} docs, {nbytes / 1e6:,.0f} MB in {elapsed:.2f} s)")  # fmt: skip
    print(f"  ratio ours / plain loop: {rates['ours'][0] / rates['plain loop'][0]:.2f}x docs/s, "
          f"{rates['ours'][1] / rates['plain loop'][1]:.2f}x MB/s "
          f"({args.processes or os.cpu_count()} processes for ours, 1 for the loop; "
          f"{os.cpu_count()} CPUs)")  # fmt: skip


if __name__ == "__main__":
    main()
