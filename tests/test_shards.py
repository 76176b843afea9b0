import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import shards as S


def _png(color, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    for cls, color in (("cat", "red"), ("dog", "blue")):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            (root / cls / f"{i}.png").write_bytes(_png(color))
    good = _jpeg("green")
    (root / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])  # cut mid-scan
    (root / "dog" / "garbage.jpg").write_bytes(b"this is not an image")
    return root


def test_folder_with_classes_skips_and_counts_corrupt_images(image_folder, tmp_path, capsys):
    items, total, classes = S.folder_items(image_folder)
    m = S.write_shards(items, tmp_path / "out", shard_size=4, total=total, classes=classes, progress=False)
    assert classes == ["cat", "dog"]
    assert m["num_samples"] == 10 and m["num_skipped"] == 2
    assert {s["item"].rsplit("/", 1)[1] for s in m["skipped"]} == {"truncated.jpg", "garbage.jpg"}
    assert [s["num_samples"] for s in m["shards"]] == [4, 4, 2]
    assert m["fields"] == ["cls", "png"]
    for s in m["shards"]:
        path = tmp_path / "out" / s["file"]
        assert S.sha256_file(path) == s["sha256"] and path.stat().st_size == s["bytes"]
    labels = []
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        for member in tar:
            if member.name.endswith(".cls"):
                labels.append(int(tar.extractfile(member).read()))
    assert labels == [0, 0, 0, 0]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m


def test_folder_without_classes_has_no_labels(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(_jpeg("white"))
    items, total, classes = S.folder_items(root)
    m = S.write_shards(items, tmp_path / "out", total=total, progress=False)
    assert classes == [] and m["fields"] == ["jpg"] and m["image_key"] == "jpg"


def test_captions(tmp_path):
    root = tmp_path / "stamps"
    root.mkdir()
    (root / "cat.png").write_bytes(_png("orange"))
    (root / "cat.txt").write_text("\nA cat.\nsecond line ignored\n")
    (root / "nocap.png").write_bytes(_png("black"))  # no caption: not an image+caption pair
    items, total = S.caption_items(root)
    m = S.write_shards(items, tmp_path / "out", total=total, progress=False)
    assert m["num_samples"] == 1 and m["fields"] == ["png", "txt"]
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert tar.extractfile("000000000.txt").read() == b"A cat."


def test_background_flattens_transparency(tmp_path):
    """``background``: images with alpha (RGBA, LA, palette or RGB with a transparent colour) are composited on
    it and stored as RGB PNG; opaque images keep their bytes; without it, alpha is kept as it was."""
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent, stored black
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    sources = {"rgba": rgba, "la": Image.new("LA", (4, 4), (0, 0)), "p": rgba.convert("P")}
    sources["p"].info["transparency"] = sources["p"].getpixel((0, 0))
    blobs = {}
    for name, img in sources.items():
        buf = io.BytesIO()
        img.save(buf, format="PNG", **({"transparency": img.info["transparency"]} if name == "p" else {}))
        blobs[name] = buf.getvalue()
    opaque = _jpeg("green")
    items = [S.Item(n, b, "png", None, n) for n, b in blobs.items()] + [S.Item("opaque", opaque, "jpg", None, "x")]
    m = S.write_shards(items, tmp_path / "white", background="white", progress=False)
    S.write_shards(items, tmp_path / "kept", progress=False)
    assert m["image_keys"] == ["jpg", "png"] and m["image_modes"] == {"RGB": 4}
    with tarfile.open(tmp_path / "white" / "shard-000000.tar") as white, \
            tarfile.open(tmp_path / "kept" / "shard-000000.tar") as kept:
        for i in range(3):
            img = Image.open(io.BytesIO(white.extractfile(f"{i:09d}.png").read()))
            assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255), (i, img.mode)
            assert kept.extractfile(f"{i:09d}.png").read() == list(blobs.values())[i]
        assert Image.open(io.BytesIO(white.extractfile("000000000.png").read())).getpixel((1, 1)) == (255, 0, 0)
        assert white.extractfile("000000003.jpg").read() == opaque


def test_idx_arrays_round_trip(tmp_path):
    arr = (np.arange(6 * 28 * 28) % 251).astype(np.uint8).reshape(6, 28, 28)
    import gzip
    import struct

    with gzip.open(tmp_path / "imgs.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 6, 28, 28) + arr.tobytes())
    with gzip.open(tmp_path / "labs.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 6) + bytes(range(6)))
    items, total = S.idx_items(tmp_path / "imgs.gz", tmp_path / "labs.gz")
    S.write_shards(items, tmp_path / "out", shard_size=4, total=total, progress=False)
    with tarfile.open(tmp_path / "out" / "shard-000001.tar") as tar:
        img = np.array(Image.open(io.BytesIO(tar.extractfile("000000005.png").read())))
        assert tar.extractfile("000000005.cls").read() == b"5"
    assert np.array_equal(img, arr[5])


def test_truncated_idx_is_reported(tmp_path):
    import gzip
    import struct

    with gzip.open(tmp_path / "imgs.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 6, 28, 28) + b"\0" * 100)
    with pytest.raises(S.ShardError, match="truncated"):
        S.read_idx(tmp_path / "imgs.gz")


def test_dali_index_matches_wds2idx(image_folder, tmp_path):
    pytest.importorskip("wds2idx", reason="DALI's wds2idx is installed with nvidia-dali")
    items, total, _ = S.folder_items(image_folder)
    S.write_shards(items, tmp_path / "out", shard_size=100, total=total, progress=False)
    ref = tmp_path / "ref.idx"
    subprocess.run([sys.executable, "-c", "import sys, wds2idx; sys.exit(wds2idx.main())",
                    str(tmp_path / "out" / "shard-000000.tar"), str(ref)], check=True, capture_output=True)
    assert (tmp_path / "out" / "shard-000000.idx").read_text() == ref.read_text()


def test_open_shards_errors(tmp_path, image_folder):
    with pytest.raises(S.ShardError, match="not found"):
        S.open_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.ShardError, match="no manifest.json"):
        S.open_shards(tmp_path / "empty")
    with pytest.raises(S.ShardError, match="no shard folder given"):
        S.open_shards("")
    items, total, _ = S.folder_items(image_folder)
    S.write_shards(items, tmp_path / "out", shard_size=4, total=total, progress=False)
    with pytest.raises(S.ShardError, match=r"\['txt'\] are needed"):
        S.open_shards(tmp_path / "out", require=("txt",))
    shard = tmp_path / "out" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:2000])
    with pytest.raises(S.ShardError, match="shard-000001.tar is 2000 bytes but the manifest says"):
        S.open_shards(tmp_path / "out")
    (tmp_path / "out" / "shard-000002.tar").unlink()
    with pytest.raises(S.ShardError, match="shard-000002.tar listed in .* is missing"):
        S.open_shards(tmp_path / "out", verify="none")


def test_cli_writes_fashion_mnist_subset(tmp_path):
    from tests.conftest import FASHION_MNIST

    if not FASHION_MNIST.exists():
        pytest.skip("Fashion-MNIST not installed")
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "shards", "write", "--format", "idx",
         "--input", str(FASHION_MNIST / "t10k-images-idx3-ubyte.gz"),
         "--labels", str(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz"), "--classes", "fashion-mnist",
         "--output", str(tmp_path / "fm"), "--shard-size", "4000", "--no-progress"],
        capture_output=True, text=True, check=True)
    assert "wrote 10000 samples in 3 shards" in out.stdout
    m = S.open_shards(tmp_path / "fm", verify="sha256").manifest
    assert m["classes"][9] == "Ankle boot" and [s["num_samples"] for s in m["shards"]] == [4000, 4000, 2000]


def test_cli_captions_labelled_data_from_class_names(image_folder, tmp_path, capsys):
    """``shards write --captions``: every sample of a labelled source gets a txt caption, template i mod n with
    its lower-cased class name (Fashion-MNIST's zero-shot templates when none are given), labels kept; sources
    without class names are refused."""
    from pipeline.cli import main
    from pipeline.config import FMNIST_TEMPLATES
    from tests.conftest import write_idx

    arr = (np.arange(8 * 28 * 28) % 251).astype(np.uint8).reshape(8, 28, 28)
    images, labels = write_idx(tmp_path / "i.gz", arr), write_idx(tmp_path / "l.gz", np.array([0, 5, 9, 3, 1, 2, 8, 7]))
    idx = ["shards", "write", "--format", "idx", "--input", str(images), "--labels", str(labels), "--classes",
           "fashion-mnist", "--no-progress"]
    assert main([*idx, "--captions", "--output", str(tmp_path / "default")]) == 0
    assert main([*idx, "--captions", "a photo of a {}.", "the {}", "--output", str(tmp_path / "two")]) == 0
    for out, templates in (("default", FMNIST_TEMPLATES), ("two", ("a photo of a {}.", "the {}"))):
        m = S.open_shards(tmp_path / out).manifest
        assert m["fields"] == ["cls", "png", "txt"] and m["num_samples"] == 8
        with tarfile.open(tmp_path / out / "shard-000000.tar") as tar:
            for i, label in enumerate([0, 5, 9, 3, 1, 2, 8, 7]):
                assert tar.extractfile(f"{i:09d}.cls").read() == str(label).encode()
                caption = templates[i % len(templates)].format(S.FASHION_MNIST_CLASSES[label].lower())
                assert tar.extractfile(f"{i:09d}.txt").read().decode() == caption
    with tarfile.open(tmp_path / "two" / "shard-000000.tar") as tar:
        assert tar.extractfile("000000002.txt").read() == b"a photo of a ankle boot."

    assert main(["shards", "write", "--format", "folder", "--input", str(image_folder), "--captions",
                 "a photo of a {}.", "--output", str(tmp_path / "folder"), "--no-progress"]) == 0
    with tarfile.open(tmp_path / "folder" / "shard-000000.tar") as tar:
        captions = {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".txt")}
    assert sorted(set(captions.values())) == [b"a photo of a cat.", b"a photo of a dog."] and len(captions) == 10

    with pytest.raises(SystemExit, match="--captions needs labels with class names"):
        main(["shards", "write", "--format", "idx", "--input", str(images), "--captions", "--output", str(tmp_path / "x")])
    capsys.readouterr()
    assert main([*idx, "--captions", "a photo", "--output", str(tmp_path / "y")]) == 1  # one line, no traceback
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "pipeline shards write: error: caption templates need a {} for the class name, got ['a photo']")


def test_tuxpaint_stamps_make_english_caption_shards(tmp_path):
    """benchmarks/make_tuxpaint_shards.py, run as a user would, on the real Debian package (fetched with
    apt-get into a fresh cache): one sample per stamp PNG with a caption file (785 in 2022.06.04), each a PNG
    without alpha and a non-empty English caption (the .txt's first line, not a translation line), transparent
    stamps composited on white."""
    import shutil

    from benchmarks.make_tuxpaint_shards import fetch_stamps

    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        pytest.skip("needs apt-get and dpkg (Debian/Ubuntu)")
    cache = tmp_path / "cache"
    try:
        stamps = fetch_stamps(cache)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"apt-get could not download tuxpaint-stamps-default (offline, or no package lists: "
                    f"apt-get update): {(exc.stderr or '').strip()[-300:]}")
    pairs = [p for p in stamps.rglob("*.png") if p.with_suffix(".txt").exists()]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "benchmarks/make_tuxpaint_shards.py", str(tmp_path / "shards"),
                          "--cache", str(cache)], cwd=root, capture_output=True, text=True, check=True)
    assert f"wrote {len(pairs)} samples" in out.stdout and len(pairs) > 700

    m = S.open_shards(tmp_path / "shards", verify="sha256").manifest
    assert m["fields"] == ["png", "txt"] and m["num_samples"] == len(pairs) and m["num_skipped"] == 0
    captions, white_corners = [], 0
    for shard in m["shards"]:
        with tarfile.open(tmp_path / "shards" / shard["file"]) as tar:
            members = {mem.name: tar.extractfile(mem).read() for mem in tar}
        keys = sorted({name.split(".")[0] for name in members})
        assert all({f"{k}.png", f"{k}.txt"} <= members.keys() for k in keys)
        for k in keys:
            img = Image.open(io.BytesIO(members[f"{k}.png"]))
            assert img.mode in ("RGB", "L", "P") and "transparency" not in img.info, (k, img.mode)
            white_corners += img.convert("RGB").getpixel((0, 0)) == (255, 255, 255)
            captions.append(members[f"{k}.txt"].decode("utf-8"))
    assert len(captions) == len(pairs) and all(c.strip() for c in captions)
    assert not [c for c in captions if ".utf8=" in c or "\n" in c]  # first lines only, no translations
    assert sum(c.isascii() for c in captions) > 0.9 * len(captions)  # English ("A knight’s helmet." is not ASCII)
    assert "A US 25 cent piece ($.25) called a quarter." in captions
    # most stamps have transparent corners; their stored colour is mostly black, so white means composited
    assert white_corners > 0.8 * len(captions), white_corners
