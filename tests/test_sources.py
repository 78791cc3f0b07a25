"""Sources for preprocess: webdataset tars, parquet, saved datasets, class folders, and bad inputs
skipped and counted by kind while every good item reaches the shards."""

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image
from tiny import NoText, in_corners_only

from latentdit.data import preprocess
from latentdit.datasets.archives import expand_braces, expand_paths
from latentdit.samples import Skip, decode_caption, decode_image, decode_label
from latentdit.shards import ShardReader
from latentdit.sources import open_source
from latentdit.vae import load_autoencoder


def _png(color=(200, 30, 30), size=(16, 16), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _truncated() -> bytes:
    """A noisy JPEG cut in half (the decoder runs out of data mid-scan)."""
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    data = _jpeg(Image.fromarray(noise))
    return data[: len(data) // 2]


def _bomb() -> bytes:
    """A valid PNG whose header claims 100000 x 100000 pixels (the data is a 16 x 16 image)."""
    data = bytearray(_png())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr: ihdr + 8] = struct.pack(">II", 100_000, 100_000)
    data[ihdr + 13: ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4: ihdr + 13])) & 0xFFFFFFFF)
    return bytes(data)


def _odd_good_images() -> dict[str, bytes]:
    """Valid images in unusual encodings: each must be kept and converted to plain RGB."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees when shown
    wide = Image.new("RGB", (24, 16), (40, 80, 220))
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 8, 16))  # left half index 1 (red), right half index 0 (transparent)
    pal_buf = io.BytesIO()
    pal.save(pal_buf, "PNG", transparency=0)
    deep = Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16))  # 16-bit gray, mid level
    deep_buf = io.BytesIO()
    deep.save(deep_buf, "PNG")
    return {"cmyk.jpg": _jpeg(Image.new("CMYK", (16, 16), (0, 255, 255, 0))),  # red in CMYK
            "exif.jpg": _jpeg(wide, exif=exif), "palette.png": pal_buf.getvalue(),
            "deep.png": deep_buf.getvalue(), "gray.png": _png(90, mode="L")}


def test_odd_images_are_converted_not_dropped():
    odd = {k: decode_image(v) for k, v in _odd_good_images().items()}
    assert all(im.mode == "RGB" for im in odd.values())
    r, g, b = odd["cmyk.jpg"].getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60
    assert odd["exif.jpg"].size == (16, 24)  # rotated by its EXIF orientation
    assert odd["palette.png"].getpixel((2, 2)) == (255, 0, 0)
    assert odd["palette.png"].getpixel((12, 2)) == (255, 255, 255)  # transparent -> white, not black
    assert odd["deep.png"].getpixel((4, 4))[0] in (127, 128)  # scaled from 16 bits, not clipped to 255
    assert odd["gray.png"].getpixel((0, 0)) == (90, 90, 90)


@pytest.mark.parametrize("data, kind", [
    (_truncated(), "unreadable"), (_png()[:60], "unreadable"), (b"", "unreadable"),
    (_png(size=(1, 1)), "too-small"), (_bomb(), "too-large"),
])
def test_bad_images_raise_skip_by_kind(data, kind):
    with pytest.raises(Skip) as err:
        decode_image(data)
    assert err.value.kind == kind


def test_captions_and_labels():
    assert decode_caption(b"  a red circle \n") == "a red circle"
    assert decode_caption("一只红色的猫".encode()) == "一只红色的猫"
    for raw, kind in [(b"\xff\xfe caption", "bad-caption"), (b"  \n", "empty-caption"), (None, "no-caption")]:
        with pytest.raises(Skip) as err:
            decode_caption(raw)
        assert err.value.kind == kind
    assert decode_label(b"3\n") == 3 and decode_label("shirt", ["coat", "shirt"]) == 1 and decode_label(0) == 0
    for raw, kind in [(None, "no-label"), (b"", "no-label"), ("cat", "bad-label"), (-1, "bad-label")]:
        with pytest.raises(Skip) as err:
            decode_label(raw)
        assert err.value.kind == kind
    with pytest.raises(Skip, match="out of range"):
        decode_label(5, ["a", "b"])


def test_brace_patterns_and_paths(tmp_path):
    assert expand_braces("data-{000..002}.tar") == ["data-000.tar", "data-001.tar", "data-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    with pytest.raises(ValueError, match="counts down"):
        expand_braces("x-{5..1}.tar")
    for i in range(2):
        (tmp_path / f"d-{i:03d}.tar").write_bytes(b"")
    assert len(expand_paths(str(tmp_path / "d-{000..001}.tar"))) == 2
    assert len(expand_paths(str(tmp_path))) == 2
    with pytest.raises(ValueError, match="does not exist"):
        expand_paths(str(tmp_path / "d-{000..002}.tar"))


# ----------------------------------------------------------------------------- webdataset


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _messy_set(tmp_path):
    """Two shards: 24 good samples (8 of them odd encodings) and 9 bad ones (27%)."""
    good, bad, members = [], {}, [[], []]
    odd = list(_odd_good_images().items())
    for i in range(24):
        key = f"{i:06d}"
        name, image = odd[i % len(odd)] if i % 3 == 0 else ("x.png", _png((10 * i, 100, 50)))
        ext = name.split(".")[1]
        cap = f"good sample {i}"
        shard = members[i % 2]
        shard.append((f"{key}.{ext}", image))
        if i % 4 == 1:  # img2dataset writes the caption into .json as well
            shard.append((f"{key}.json", json.dumps({"caption": cap, "url": "http://x"}).encode()))
        else:
            shard.append((f"{key}.txt", cap.encode()))
        shard.append((f"{key}.cls", str(i % 5).encode()))
        good.append((cap, i % 5))
    cases = [("unreadable", _truncated(), b"truncated", b"1"), ("too-small", _png(size=(1, 1)), b"tiny", b"1"),
             ("too-large", _bomb(), b"bomb", b"1"), ("bad-caption", _png(), b"\xff\xfebad", b"1"),
             ("empty-caption", _png(), b"   ", b"1"), ("no-label", _png(), b"unlabelled", None),
             ("bad-label", _png(), b"badly labelled", b"cat"), ("no-image", None, b"text only", b"1"),
             ("unreadable", b"GIF89a garbage", b"garbage", b"2")]
    for j, (kind, image, cap, cls) in enumerate(cases):
        key, shard = f"bad{j:03d}", members[j % 2]
        if image is not None:
            shard.append((f"{key}.png", image))
        shard.append((f"{key}.txt", cap))
        if cls is not None:
            shard.append((f"{key}.cls", cls))
        bad[kind] = bad.get(kind, 0) + 1
    for k in range(2):
        _write_tar(tmp_path / f"data-{k:03d}.tar", members[k])
    return good, bad


def test_messy_webdataset_keeps_every_good_item_and_counts_bad_ones_by_kind(tmp_path, tiny_clip):
    good, bad = _messy_set(tmp_path)
    assert sum(bad.values()) / (len(good) + sum(bad.values())) >= 0.10
    source = open_source(str(tmp_path / "data-{000..001}.tar"), labels=True)
    with pytest.warns(UserWarning, match="skipped 9 unusable files"):
        manifest = preprocess(source, tmp_path / "shards", autoencoder=load_autoencoder("identity"),
                              text_encoder=tiny_clip, image_size=16, shard_size=10, batch_size=4,
                              progress=False, labels=True)
    assert manifest["skips"] == bad and manifest["skipped"] == 9
    assert manifest["labels"]["num_classes"] == 5
    reader = ShardReader(tmp_path / "shards")
    rows = [r for k in range(len(reader.manifest["shards"])) for r in reader.rows(k)]
    by_shard = [c for shard in (0, 1) for c in good[shard::2]]  # tars are read one after the other
    assert [(r["caption"], r["label"]) for r in rows] == by_shard
    batch = next(reader.batches(len(good), seed=0))
    assert sorted(zip(batch.captions, batch.labels.tolist())) == sorted(good)


def test_truncated_tar_keeps_what_came_before_and_reads_the_next(tmp_path):
    members = [(f"{i:04d}.png", _png((i, 0, 0))) for i in range(6)]
    members = [m for i, (n, d) in enumerate(members) for m in ((n, d), (f"{i:04d}.txt", f"c{i}".encode()))]
    _write_tar(tmp_path / "a.tar", members)
    _write_tar(tmp_path / "b.tar", [("k.png", _png()), ("k.txt", b"from b")])
    raw = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(raw[: 4 * 2048 + 512 + 40])  # inside sample 4's image data
    source = open_source(str(tmp_path / "{a,b}.tar"))
    assert [s.caption for s in source] == ["c0", "c1", "c2", "c3", "from b"]
    assert source.skips == {"bad-archive": 1}  # sample 4 is lost with the damage, not counted twice


def test_tar_over_a_url(tmp_path):
    pytest.importorskip("fsspec")
    _write_tar(tmp_path / "u.tar", [("a.jpg", _jpeg(Image.new("RGB", (16, 16)))), ("a.txt", b"by url")])
    assert [s.caption for s in open_source(f"file://{tmp_path}/u.tar")] == ["by url"]


# ----------------------------------------------------------------------------- folders, tables


def test_class_folders_give_labels_and_class_names(tmp_path, tiny_clip):
    for k, name in enumerate(["coat", "bag", "shirt"]):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (16, 16), (k * 80, i * 100, 0)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "shirt" / "broken.png").write_bytes(b"\x89PNG broken")
    source = open_source(tmp_path, labels=True)
    assert source.classes == ["bag", "coat", "shirt"]
    with pytest.warns(UserWarning, match="unreadable: 1"):
        manifest = preprocess(source, tmp_path / "shards", autoencoder=load_autoencoder("identity"),
                              text_encoder=tiny_clip, progress=False, labels=True)
    assert manifest["labels"] == {"num_classes": 3, "classes": ["bag", "coat", "shirt"]}
    rows = ShardReader(tmp_path / "shards").rows(0)
    assert [(r["caption"], r["label"]) for r in rows] == [("bag", 0), ("bag", 0), ("coat", 1), ("coat", 1),
                                                          ("shirt", 2), ("shirt", 2)]
    with pytest.raises(ValueError, match="with class labels; this run has none"):  # resume must not mix
        preprocess(open_source(tmp_path / "coat"), tmp_path / "shards", autoencoder=load_autoencoder("identity"),
                   text_encoder=tiny_clip, progress=False)


def test_caption_folders_take_every_image_type_the_concept_folders_take(tmp_path):
    from latentdit.pixels import IMAGE_SUFFIXES

    for k, suffix in enumerate(IMAGE_SUFFIXES):
        Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(tmp_path / f"{k}{suffix}")
        (tmp_path / f"{k}.txt").write_text(f"image {k}")
    (tmp_path / "notes.gif").write_bytes(b"GIF89a")  # not an image type the folders read
    assert [s.caption for s in open_source(tmp_path)] == [f"image {k}" for k in range(len(IMAGE_SUFFIXES))]
    assert ".bmp" in IMAGE_SUFFIXES


def test_img2dataset_parquet_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"key": ["0", "1", "2"], "jpg": [_jpeg(Image.new("RGB", (16, 16))), b"junk", _png()],
                      "txt": ["first", "second", "third"], "url": ["u0", "u1", "u2"]})
    pq.write_table(table, tmp_path / "00000.parquet")
    source = open_source(tmp_path)  # a folder of parquet files
    assert [s.caption for s in source] == ["first", "third"] and source.skips == {"unreadable": 1}
    assert source.total == 3
    with pytest.raises(ValueError, match="no column 'photo'.*columns are"):
        open_source(tmp_path / "00000.parquet", image_column="photo")
    with pytest.raises(ValueError, match="no label column"):
        open_source(tmp_path / "00000.parquet", labels=True)


def test_saved_hf_dataset_with_class_label(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "desc": datasets.Value("string"),
                                  "y": datasets.ClassLabel(names=["cat", "dog"])})
    images = [{"bytes": _png((0, 0, 200)), "path": None}, {"bytes": b"\x89PNG bad", "path": None},
              {"bytes": _png((0, 200, 0)), "path": None}]
    ds = datasets.Dataset.from_dict({"img": images, "desc": ["a blue one", "bad", "a green one"], "y": [1, 0, 0]},
                                    features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    source = open_source(tmp_path / "saved", labels=True, image_column="img", caption_column="desc",
                         label_column="y")
    samples = list(source)
    assert [(s.caption, s.label) for s in samples] == [("a blue one", 1), ("a green one", 0)]
    assert source.classes == ["cat", "dog"] and source.skips == {"unreadable": 1}
    assert samples[0].image.getpixel((0, 0)) == (0, 0, 200)
    with pytest.raises(ValueError, match="splits"):
        open_source(tmp_path / "saved", split="test")


def test_preprocess_cli_with_braces_and_labels(tmp_path, capsys, monkeypatch):
    from latentdit.cli import main

    _messy_set(tmp_path)
    monkeypatch.setattr("latentdit.text.load_text_encoder", lambda *a, **k: NoText())
    code = main(["preprocess", "--source", str(tmp_path / "data-{000..001}.tar"), "--labels", "--size", "16",
                 "--out", str(tmp_path / "shards"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "24 samples" in out and "5 classes" in out and "9 unusable inputs skipped" in out
    assert "too-large 1" in out
    assert ShardReader(tmp_path / "shards").num_classes == 5


def test_shapes_scene_weights_set_the_mix_and_apply_to_shapes_only(tmp_path, capsys, monkeypatch):
    from collections import Counter

    from latentdit.cli import main

    def scenes(weights, n=300):
        source = open_source("shapes", n=n, size=16, scene_weights=weights)
        return Counter(source.dataset.draw(i)[0]["scene"] for i in range(n))

    assert set(scenes((0, 1, 0), 40)) == {"relation"}
    mix = scenes((1, 2, 2))
    assert 0.12 < mix["single"] / 300 < 0.28 and mix["relation"] > 1.5 * mix["single"]
    assert scenes(None) == scenes((1, 1, 1))    # the default is the equal mix
    with pytest.raises(ValueError, match="shapes source only"):
        open_source(str(tmp_path), scene_weights=(1, 1, 1))
    with pytest.raises(ValueError, match="scene_weights must be 3"):
        open_source("shapes", n=4, scene_weights=(0, 0, 0))

    monkeypatch.setattr("latentdit.text.load_text_encoder", lambda *a, **k: NoText())
    out = tmp_path / "shards"
    code = main(["preprocess", "--source", "shapes", "--n", "12", "--size", "16", "--scene-weights", "0", "0", "1",
                 "--out", str(out), "--no-progress"])
    assert code == 0 and "12 samples" in capsys.readouterr().out
    rows = [json.loads(line) for f in sorted(out.glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert len(rows) == 12 and {r["attributes"]["scene"] for r in rows} == {"count"}


def test_preprocess_draws_the_distinct_count_layout_when_asked(tmp_path, capsys, monkeypatch):
    from latentdit.cli import main

    monkeypatch.setattr("latentdit.text.load_text_encoder", lambda *a, **k: NoText())
    cornered = {}
    for layout in ("any", "distinct"):
        out = tmp_path / layout
        assert main(["preprocess", "--source", "shapes", "--n", "60", "--size", "16", "--scene-weights", "0", "0", "1",
                     "--seed", "3", "--count-layout", layout, "--out", str(out), "--no-progress"]) == 0
        rows = [json.loads(line) for f in sorted(out.glob("*.jsonl")) for line in f.read_text().splitlines()]
        cornered[layout] = sum(in_corners_only(r["attributes"]["objects"]) for r in rows)
    assert cornered["distinct"] == 0 < cornered["any"]
    with pytest.raises(ValueError, match="count layout applies to the shapes source only"):
        open_source(str(tmp_path), count_layout="distinct")


def test_the_shapes_source_writes_captions_in_the_language_asked_for(tmp_path):
    import re

    from latentdit.sources import open_source

    zh = [s.caption for s in open_source("shapes", n=20, lang="zh")]
    mixed = [s.caption for s in open_source("shapes", n=40, lang="en+zh")]
    english = list(open_source("shapes", n=40))
    assert all(re.search(r"[\u4e00-\u9fff]", c) for c in zh)
    chinese = [bool(re.search(r"[\u4e00-\u9fff]", c)) for c in mixed]
    assert 0 < sum(chinese) < 40  # both languages, over the same scenes as the English source
    assert [c for c, z in zip(mixed, chinese) if not z] == [s.caption for s, z in zip(english, chinese) if not z]
    folder = tmp_path / "imgs"
    folder.mkdir()
    with pytest.raises(ValueError, match="caption language applies to the shapes source only"):
        open_source(str(folder), lang="zh")
