"""What chunk integrity costs and what it catches, and how fast the training job refuses bad input (issue 15).

    PYTHONPATH=. .venv/bin/python benchmarks/integrity.py              the real run (~2 minutes on 2 cores)
    PYTHONPATH=. .venv/bin/python benchmarks/integrity.py --smoke      < 60 s (the test)
    options: --side 1500 --chunk 256 --repeats 5 --json FILE

1. Codec cost, side by side in one process, on two images: a Megapixel-MNIST-like one (--side px square, 5 real
   MNIST digits and 50 line-noise patterns on black, pipeline.megapixel_mnist: mostly empty, tiny chunks, so the
   per-chunk overhead shows) and the real H&E sample CMU-1-Small-Region (2220 x 2967 RGB, dense tissue: the bytes
   dominate). Each is written as a zarr v3 array of --chunk px chunks with the project's codecs (Blosc zstd-5 +
   shuffle, then crc32c) and without crc32c (how chunks were stored before), every chunk written in both; --repeats
   alternating rounds of (write all chunks, read all chunks) per variant, the median reported with stored bytes.
   One thread (zarr's async pool still does I/O), so the ratio is per core.
2. Flips: every byte of the stored chunk holding the most digit pixels, XOR 0xFF one at a time, read back through
   the variant: how many reads raised a typed CorruptChunkError, raised something else, returned wrong pixels, or
   returned the right pixels (flips in bytes the decoder ignores). With crc32c every flip must be typed.
3. Fail fast: `jobs/train.py` on bad inputs, each in a fresh process as a user runs it, timed from start to exit
   (exit status 2 and one "train: error:" line expected): a missing ROOT, a ROOT without a manifest, a split whose
   every image failed, a deleted pyramid, a patch larger than the images, more patches than attention cells. The
   load average is printed before and after each timing block (the machine is shared; never time two heavy jobs).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import load_average

PROJECT = Path(__file__).resolve().parents[1]


def _image(side: int) -> np.ndarray:
    from pipeline import megapixel_mnist as mm

    config = mm.MegapixelMNISTConfig(size=side)
    return mm.make_image(mm.load_bank("test"), "test", 0, config).image  # (1, side, side) uint8


def _he_sample(smoke: bool) -> np.ndarray:
    """The real H&E sample (3, 2220, 2967) uint8 (a 512 px corner for the smoke run)."""
    from pipeline.datasets import sample_path
    from pipeline.sources import open_source

    src = open_source(str(sample_path("cmu_small_region.svs")))
    try:
        pixels = np.asarray(src.array[:, :512, :512] if smoke else src.array)  # (3, H, W)
    finally:
        src.close()
    return np.ascontiguousarray(pixels)


def _codecs(crc: bool) -> list:
    from zarr.codecs import BloscCodec, Crc32cCodec

    blosc = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    return [blosc, Crc32cCodec()] if crc else [blosc]


def codec_cost(img: np.ndarray, chunk: int, repeats: int, scratch: Path) -> dict:
    import zarr

    times: dict[str, dict[str, list[float]]] = {v: {"write": [], "read": []} for v in ("crc32c", "plain")}
    sizes = {}
    for r in range(repeats):
        for variant in ("crc32c", "plain") if r % 2 == 0 else ("plain", "crc32c"):
            path = scratch / f"{variant}.zarr"
            shutil.rmtree(path, ignore_errors=True)
            array = zarr.create_array(str(path), shape=img.shape, chunks=(1, chunk, chunk), dtype=img.dtype,
                                      compressors=_codecs(variant == "crc32c"), zarr_format=3,
                                      config={"write_empty_chunks": True})
            t = time.perf_counter()
            array[:] = img
            times[variant]["write"].append(time.perf_counter() - t)
            t = time.perf_counter()
            back = array[:]
            times[variant]["read"].append(time.perf_counter() - t)
            assert np.array_equal(back, img)
            sizes[variant] = sum(f.stat().st_size for f in (path / "c").rglob("*") if f.is_file())
    out = {v: {k: statistics.median(ts) for k, ts in d.items()} | {"bytes": sizes[v]} for v, d in times.items()}
    mp = img.size / 1e6
    for v in out.values():
        v["write_mp_s"], v["read_mp_s"] = mp / v["write"], mp / v["read"]
    return out


def flips(img: np.ndarray, chunk: int, scratch: Path) -> dict:
    import zarr

    from pipeline.errors import CorruptChunkError
    from pipeline.reader import fetch_chunks

    n = img.shape[1] // chunk
    ink = [[int(img[:, y * chunk:(y + 1) * chunk, x * chunk:(x + 1) * chunk].astype(bool).sum()) for x in range(n)]
           for y in range(n)]
    cy, cx = np.unravel_index(int(np.argmax(ink)), (n, n))
    want = img[:, cy * chunk:(cy + 1) * chunk, cx * chunk:(cx + 1) * chunk]
    result = {"chunk": [int(cy), int(cx)], "ink_pixels": int(np.max(ink))}
    for variant in ("crc32c", "plain"):
        path = scratch / f"flip-{variant}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        array = zarr.create_array(str(path), shape=img.shape, chunks=(1, chunk, chunk), dtype=img.dtype,
                                  compressors=_codecs(variant == "crc32c"), zarr_format=3)
        array[:] = img
        key = path / "c" / "0" / str(cy) / str(cx)
        original = key.read_bytes()
        counts = {"bytes": len(original), "typed": 0, "other_error": 0, "wrong_pixels": 0, "same_pixels": 0}
        for i in range(len(original)):
            damaged = bytearray(original)
            damaged[i] ^= 0xFF
            key.write_bytes(bytes(damaged))
            try:
                (got,) = fetch_chunks(array, [(int(cy), int(cx))], image_id="bench", level=0)
                counts["same_pixels" if np.array_equal(got, want) else "wrong_pixels"] += 1
            except CorruptChunkError:
                counts["typed"] += 1
            except Exception:  # noqa: BLE001 - counted, that is the point
                counts["other_error"] += 1
        key.write_bytes(original)
        result[variant] = counts
    return result


def fail_fast(scratch: Path, smoke: bool) -> list[dict]:
    """Each bad input through `python jobs/train.py`, timed from process start to exit."""
    from pipeline.ingest import WriteOptions, ingest_generated
    from pipeline.manifest import ManifestRow, write_manifest
    from pipeline.megapixel_mnist import MegapixelMNISTConfig

    good = str(scratch / "good")
    assert ingest_generated(good, MegapixelMNISTConfig(size=192, n_digits=3, n_noise=4), n_train=4, n_test=2,
                            options=WriteOptions(chunk=64, min_size=48)).complete
    failed = str(scratch / "failed")
    write_manifest(failed, [ManifestRow(image_id=f"i{k}", uri="", source=f"/x/i{k}.png", label="a", split=s,
                                        status="failed", error="CorruptImageError: truncated")
                            for k, s in enumerate(["train", "test"])], ["a"])
    deleted = str(scratch / "deleted")
    shutil.copytree(good, deleted)
    shutil.rmtree(sorted((Path(deleted) / "images").iterdir())[0])
    (scratch / "empty").mkdir()
    cases = [
        ("missing ROOT", [str(scratch / "nowhere")]),
        ("ROOT without a manifest", [str(scratch / "empty")]),
        ("every image of a split failed", [failed]),
        ("a deleted pyramid", [deleted]),
        ("patch larger than the images", [good, "--set", "model.patch_hw=400", "--set", "model.mil_stride=0"]),
        ("more patches than attention cells", [good, "--set", "data.low_scale=0.25", "--set", "model.n_patches=5000",
                                               "--set", "model.replace=false"]),
    ]
    rows = []
    for name, args in cases[:2] if smoke else cases:
        load_before = load_average()
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "jobs/train.py", "--model", "ats", "--data", *args], cwd=PROJECT,
                              capture_output=True, text=True, timeout=120)
        seconds = time.perf_counter() - t
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("train: error:")]
        rows.append({"case": name, "seconds": seconds, "exit": done.returncode, "one_line": len(lines) == 1,
                     "message": lines[0][:160] if lines else done.stderr[-300:], "load_before": load_before,
                     "load_after": load_average()})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", type=int, default=1500)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="small and quick: the test's run")
    p.add_argument("--json", help="write the raw results here")
    args = p.parse_args()
    if args.smoke:
        args.side, args.chunk, args.repeats = 512, 128, 2
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="gats-integrity-") as tmp:
        scratch = Path(tmp)
        img = _image(args.side)
        he = _he_sample(args.smoke)
        print(f"load average at start: {load_average()}")
        cost = codec_cost(img, args.chunk, args.repeats, scratch)
        cost_he = codec_cost(he, args.chunk, args.repeats, scratch)
        print(f"load average after codec timings: {load_average()}")
        flipped = flips(img, args.chunk, scratch)
        fast = fail_fast(scratch, args.smoke)
        print(f"load average at end: {load_average()}")

    print(f"\n## codec cost: {args.chunk} px chunks, median of {args.repeats}, one thread\n")
    print("| image | codecs | write s | write MP/s | read s | read MP/s | stored bytes |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for label, result, shape in ((f"Megapixel MNIST {args.side}^2", cost, img.shape),
                                 (f"H&E CMU-1-Small-Region {he.shape[1]}x{he.shape[2]} RGB", cost_he, he.shape)):
        c, q = result["crc32c"], result["plain"]
        for name, v in (("blosc zstd-5 + crc32c (now)", c), ("blosc zstd-5 (before)", q)):
            print(f"| {label} | {name} | {v['write']:.3f} | {v['write_mp_s']:.1f} | {v['read']:.3f} | "
                  f"{v['read_mp_s']:.1f} | {v['bytes']:,} |")
        ratios.append(f"{label}: write {c['write'] / q['write']:.3f}x, read {c['read'] / q['read']:.3f}x, bytes "
                      f"{c['bytes'] / q['bytes']:.4f}x")
    print("\ncrc32c / plain: " + "; ".join(ratios))
    print(f"\n## every byte of chunk {flipped['chunk']} ({flipped['ink_pixels']} digit/noise pixels) flipped\n")
    print("| codecs | bytes | typed CorruptChunkError | other error | wrong pixels | same pixels |")
    print("|---|---|---|---|---|---|")
    for name in ("crc32c", "plain"):
        f = flipped[name]
        print(f"| {name} | {f['bytes']} | {f['typed']} | {f['other_error']} | {f['wrong_pixels']} | "
              f"{f['same_pixels']} |")
    print("\n## jobs/train.py on bad input (fresh process, start to exit)\n")
    print("| input | exit | one line | seconds | load before | load after |")
    print("|---|---|---|---|---|---|")
    for r in fast:
        print(f"| {r['case']} | {r['exit']} | {'yes' if r['one_line'] else 'NO'} | {r['seconds']:.2f} | "
              f"{r['load_before']} | {r['load_after']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "codec": cost, "codec_he": cost_he,
                                               "flips": flipped,
                                               "fail_fast": fast}, indent=1))
    ok = flipped["crc32c"]["typed"] == flipped["crc32c"]["bytes"] and all(r["exit"] == 2 and r["one_line"]
                                                                          for r in fast)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
