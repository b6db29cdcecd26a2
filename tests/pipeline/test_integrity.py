"""Damaged chunks are typed errors, never pixels: every byte flip, truncation or deletion of a stored chunk raises
CorruptChunkError naming the image, level and chunk (issue 15); gats-verify finds them and --repair plus an ingest
rerun restores the data. The control in the first test shows the same flips decoding silently without crc32c, so
these tests would fail on the old chunk format."""
from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from pipeline.errors import CorruptChunkError
from pipeline.ingest import WriteOptions, ingest_sources
from pipeline.manifest import read_manifest
from pipeline.pyramid import open_pyramid, write_pyramid
from pipeline.reader import PatchReader
from pipeline.storage import Storage, image_key
from pipeline.verify import repair, verify_root


def _digit_image(mnist_train: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(1, 128, 128) uint8: black, with two real MNIST digits in chunk (0, 0) (the chunk the probe found 43% of
    flips silent in) and one in chunk (1, 1)."""
    digits, _ = mnist_train
    img = np.zeros((1, 128, 128), dtype=np.uint8)
    img[0, 4:32, 6:34] = digits[0]
    img[0, 30:58, 33:61] = digits[1]
    img[0, 80:108, 90:118] = digits[2]
    return img


def _flip_all(path: Path, read: callable, mask: int) -> dict[str, int]:
    """Flip each byte of the file at `path` in turn (XOR `mask`), call `read()` after each; count the outcomes."""
    original = path.read_bytes()
    counts = {"typed": 0, "untyped": 0, "wrong": 0, "same": 0}
    try:
        for i in range(len(original)):
            damaged = bytearray(original)
            damaged[i] ^= mask
            path.write_bytes(bytes(damaged))
            try:
                counts["same" if read() else "wrong"] += 1
            except CorruptChunkError:
                counts["typed"] += 1
            except Exception:  # the control without crc32c: blosc's RuntimeError and the like
                counts["untyped"] += 1
    finally:
        path.write_bytes(original)
    return counts


@pytest.mark.parametrize("mask", [0x01, 0xFF])
def test_every_byte_flip_of_a_chunk_is_a_typed_error(tmp_path: Path, mnist_train, mask: int) -> None:
    img = _digit_image(mnist_train)
    root = str(tmp_path / "root")
    write_pyramid(root, "digits", da.from_array(img), chunk=64, min_size=64)
    reader = PatchReader(root)
    chunk = tmp_path / "root" / "images" / "digits.zarr" / "0" / "c" / "0" / "0" / "0"

    def read() -> bool:
        return bool(np.array_equal(reader.read("digits", [[0, 0, 64, 64]])[0], img[:, :64, :64]))

    assert read()
    counts = _flip_all(chunk, read, mask)
    assert counts == {"typed": chunk.stat().st_size, "untyped": 0, "wrong": 0, "same": 0}
    with pytest.raises(CorruptChunkError) as err:  # the message names image, level, chunk and the fix
        chunk.write_bytes(b"\x00" + chunk.read_bytes()[1:])
        reader.read("digits", [[10, 10, 20, 20]])
    assert all(s in str(err.value) for s in ("'digits'", "level 0", "chunk (y=0, x=0)", "'0/c/0/0/0'", "--repair"))

    # control: the same chunk without the crc32c codec (how chunks were stored before) decodes some flips silently
    plain = zarr.create_array(str(tmp_path / "plain.zarr"), shape=img.shape, chunks=(1, 64, 64), dtype="uint8",
                              compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), zarr_format=3)
    plain[:] = img
    control = _flip_all(tmp_path / "plain.zarr" / "c" / "0" / "0" / "0",
                        lambda: bool(np.array_equal(plain[:, :64, :64], img[:, :64, :64])), mask)
    assert control["wrong"] + control["same"] > 0, control


def test_truncated_empty_and_deleted_chunks_are_typed_errors(tmp_path: Path, mnist_train) -> None:
    img = _digit_image(mnist_train)
    root = str(tmp_path / "root")
    write_pyramid(root, "digits", da.from_array(img), chunk=32, min_size=32)
    reader = PatchReader(root)
    base = tmp_path / "root" / "images" / "digits.zarr"
    chunk = base / "0" / "c" / "0" / "2" / "2"  # level-0 pixels [64, 96) x [64, 96)
    original = chunk.read_bytes()
    for length in sorted({0, 1, 3, 4, len(original) // 2, len(original) - 1}):
        chunk.write_bytes(original[:length])
        with pytest.raises(CorruptChunkError, match=r"level 0, chunk \(y=2, x=2\) failed to decode"):
            reader.read("digits", [[70, 70, 20, 20]])
    chunk.unlink()
    with pytest.raises(CorruptChunkError, match=r"is missing: level 0, chunk \(y=2, x=2\) was written at ingest"):
        reader.read("digits", [[70, 70, 20, 20]])
    # an all-black chunk is stored too (empty by design is not the same as gone), and a whole-level read names it
    empty = base / "1" / "c" / "0" / "0" / "1"  # level-1 pixels [0, 32) x [32, 64) = level-0 [0, 64) x [64, 128)
    assert empty.is_file() and not img[:, :64, 64:].any()
    empty.unlink()
    with pytest.raises(CorruptChunkError, match=r"'digits'.*missing: level 1, chunk \(y=0, x=1\)"):
        reader.low_res("digits", 1)


def test_a_deleted_chunk_on_s3_is_a_typed_error(s3_root: str, mnist_train) -> None:
    img = _digit_image(mnist_train)
    write_pyramid(s3_root, "digits", da.from_array(img), chunk=64, min_size=64)
    reader = PatchReader(s3_root)
    assert np.array_equal(reader.low_res("digits", 0), img)
    Storage(s3_root).delete(f"{image_key('digits')}/0/c/0/1/0")
    with pytest.raises(CorruptChunkError, match=r"missing: level 0, chunk \(y=1, x=0\)"):
        PatchReader(s3_root).low_res("digits", 0)


def test_flips_in_a_shard_and_its_index_are_typed_errors(tmp_path: Path, mnist_train) -> None:
    img = _digit_image(mnist_train)
    root = str(tmp_path / "root")
    write_pyramid(root, "digits", da.from_array(img), chunk=32, min_size=64, shards=64)
    reader = PatchReader(root)
    shard = tmp_path / "root" / "images" / "digits.zarr" / "0" / "c" / "0" / "0" / "0"
    original = shard.read_bytes()
    index_start = len(original) - (16 * 4 * 2 + 4)  # (y, x) inner chunks of (offset, length) uint64s, then crc32c
    positions = sorted(set(range(0, index_start, 7)) | set(range(index_start, len(original))))
    silent = []
    try:
        for i in positions:
            damaged = bytearray(original)
            damaged[i] ^= 0xFF
            shard.write_bytes(bytes(damaged))
            try:
                reader.read("digits", [[0, 0, 64, 64]])  # the whole shard: every inner chunk
                silent.append(i)
            except CorruptChunkError as exc:
                assert "'digits'" in str(exc) and "level 0" in str(exc)
    finally:
        shard.write_bytes(original)
    assert silent == [] and len(positions) > 100
    assert np.array_equal(reader.read("digits", [[0, 0, 64, 64]])[0], img[:, :64, :64])


def test_a_pyramid_without_the_all_chunks_marker_still_reads_a_missing_chunk_as_fill(tmp_path: Path) -> None:
    """Pyramids written before every chunk was stored cannot tell a deleted chunk from an empty one; they open
    leniently (as they always did) and gats-verify says so."""
    img = np.full((1, 64, 64), 7, dtype=np.uint8)
    root = str(tmp_path / "root")
    write_pyramid(root, "old", da.from_array(img), chunk=32, min_size=32)
    meta_path = tmp_path / "root" / "images" / "old.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["gats"]["all_chunks"]
    meta["attributes"]["gats"]["format"] = 2
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "root" / "images" / "old.zarr" / "0" / "c" / "0" / "0" / "0").unlink()
    assert PatchReader(root).read("old", [[0, 0, 32, 32]]).max() == 0  # fill, as before


def _npy_sources(folder: Path, n: int) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(5)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (96, 80), dtype=np.uint8)
        pixels[:40, :40] = 0  # an empty-by-design region
        np.save(folder / f"im{i}.npy", pixels)
        paths.append(str(folder / f"im{i}.npy"))
    return paths


def test_verify_finds_each_kind_of_damage_and_repair_plus_rerun_restores(tmp_path: Path) -> None:
    sources = _npy_sources(tmp_path / "src", 5)
    root = str(tmp_path / "root")
    options = WriteOptions(chunk=32, min_size=32, patch_size=16)
    assert ingest_sources(root, sources, options=options).complete
    clean = verify_root(root, workers=2)
    assert [c.status for c in clean.checks] == ["ok"] * 5 and clean.damaged == ()
    assert all(c.chunks_read > 0 and c.bytes_read > 0 for c in clean.checks)
    images = tmp_path / "root" / "images"

    flipped = images / "im0.zarr" / "1" / "c" / "0" / "0" / "1"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    (images / "im1.zarr" / "0" / "c" / "0" / "0" / "0").unlink()  # a chunk that held only zeros
    (images / "im2.zarr" / "0" / "c" / "0" / "2" / "1").write_bytes(b"")
    # im3: valid chunks holding different pixels (a writer bug, not bit rot): only the checksum can see it
    zarr.open_array(str(images / "im3.zarr" / "0"), mode="r+")[0, 5, 5] = 1
    report = verify_root(root)
    by_id = {c.image_id: c for c in report.checks}
    assert by_id["im4"].status == "ok"
    assert "level 1, chunk (y=0, x=1) failed to decode" in by_id["im0"].problems[0]
    assert "missing: level 0, chunk (y=0, x=0)" in by_id["im1"].problems[0]
    assert "level 0, chunk (y=2, x=1) failed to decode" in by_id["im2"].problems[0]
    assert "do not match the stored checksum" in by_id["im3"].problems[0]
    assert [c.image_id for c in report.damaged] == ["im0", "im1", "im2", "im3"]
    assert "4 damaged" in report.summary() and "--repair" in report.summary()

    assert repair(root, report) == ["im0", "im1", "im2", "im3"]
    rows, _ = read_manifest(root)
    assert [r.status for r in rows] == ["failed"] * 4 + ["complete"]
    assert rows[0].error.startswith("damaged: ")
    rerun = ingest_sources(root, sources, options=options)
    assert rerun.complete and [o.skipped for o in rerun.outcomes] == [False] * 4 + [True]
    assert verify_root(root).damaged == ()
    for i, path in enumerate(sources):
        assert np.array_equal(open_pyramid(root, f"im{i}").arrays[0][:], np.load(path)[None])
