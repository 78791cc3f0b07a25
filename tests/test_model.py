import pytest
import torch
import torch.nn.functional as F
from tiny import perturbed

from latentdit.model import Denoiser, build_denoiser, sincos_2d


def _randomize(model: Denoiser) -> Denoiser:
    """Init leaves the output at exactly zero; perturb every weight so tests see real outputs."""
    return perturbed(model).eval()


def _inputs(n=2, h=16, w=16, length=6, dim=32, channels=4):
    x = torch.randn(n, channels, h, w)
    t = torch.rand(n)
    text = torch.randn(n, length, dim)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[-1, 4:] = False
    return x, t, text, mask, torch.randn(n, dim)


@pytest.mark.parametrize("hw", [(8, 8), (16, 16), (16, 24), (32, 8)])
def test_output_shape_for_many_sizes(hw):
    model = _randomize(build_denoiser("tiny"))
    x, t, text, mask, pooled = _inputs(h=hw[0], w=hw[1])
    assert model(x, t, text, mask, pooled).shape == x.shape


@pytest.mark.parametrize("overrides", [{}, {"mlp": "dwconv"}, {"modulation": "none"},
                                       {"qk_norm": "none"}, {"qk_norm": "rms"}, {"cross_norm": True}])
def test_zero_output_at_init(overrides):
    model = build_denoiser("tiny", **overrides)
    x, t, text, mask, pooled = _inputs()
    assert torch.count_nonzero(model(x, t, text, mask, pooled)) == 0


def test_cross_norm_adds_a_norm_before_cross_attention_and_qk_norm_inside_it():
    plain = {n for n, _ in build_denoiser("tiny", qk_norm="rms").named_parameters()}
    normed = {n for n, _ in build_denoiser("tiny", qk_norm="rms", cross_norm=True).named_parameters()}
    added = normed - plain
    assert plain < normed
    assert {n.split(".", 2)[2] for n in added} == {
        "norm_x.weight", "norm_x.bias", "cross.q_norm.weight", "cross.k_norm.weight"}
    # self-attention keeps its QK norm either way
    assert "blocks.0.attn.q_norm.weight" in plain


@pytest.mark.parametrize("mlp", ["gelu", "dwconv"])
def test_gelu_kinds_are_the_exact_and_tanh_activations(mlp):
    exact = _randomize(build_denoiser("tiny", mlp=mlp))
    tanh = build_denoiser("tiny", mlp=mlp, gelu="tanh")
    tanh.load_state_dict(exact.state_dict())
    x, t, text, mask, pooled = _inputs()
    a, b = exact(x, t, text, mask, pooled), tanh.eval()(x, t, text, mask, pooled)
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=1e-3)
    h = torch.linspace(-4, 4, 101)[None, :, None].expand(1, 101, 64).contiguous()
    block = exact.blocks[0].mlp
    ref = block.fc2(torch.nn.functional.gelu(block.fc1(h)))
    if mlp == "gelu":  # the plain MLP's activation is exactly erf GELU
        torch.testing.assert_close(block(h, (1, 101)), ref, rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [{}, {"modulation": "none"}, {"cross_norm": True}])
def test_padded_text_tokens_do_not_change_output(overrides):
    model = _randomize(build_denoiser("tiny", **overrides))
    x, t, text, mask, pooled = _inputs()
    out = model(x, t, text, mask, pooled)
    garbage = torch.randn(2, 5, 32) * 100
    padded = model(x, t, torch.cat([text, garbage], 1),
                   torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], 1), pooled)
    torch.testing.assert_close(out, padded, atol=1e-5, rtol=1e-5)
    # ...while changing a real (unmasked) token does change it
    text2 = text.clone()
    text2[0, 0] += 1.0
    assert not torch.allclose(model(x, t, text2, mask, pooled)[0], out[0], atol=1e-4)


def test_cond_uncond_batch_equals_separate_calls():
    model = _randomize(build_denoiser("tiny", mlp="dwconv"))
    x, t, text, mask, pooled = _inputs(n=1)
    nt, nm, npool = model.null_condition(1, text.shape[1])
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, nt]), torch.cat([mask, nm]),
                 torch.cat([pooled, npool]))
    torch.testing.assert_close(both[:1], model(x, t, text, mask, pooled), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1:], model(x, t, nt, nm, npool), atol=1e-5, rtol=1e-5)


def test_condition_matters_and_time_matters():
    model = _randomize(build_denoiser("tiny"))
    x, t, text, mask, pooled = _inputs()
    out = model(x, t, text, mask, pooled)
    assert not torch.allclose(out, model(x, t, text, mask, pooled + 1))
    assert not torch.allclose(out, model(x, t * 0.5, text, mask, pooled))


def test_drop_condition_replaces_only_dropped_rows():
    model = build_denoiser("tiny")
    _, _, text, mask, pooled = _inputs()
    drop = torch.tensor([True, False])
    t2, m2, p2 = model.drop_condition(text, mask, pooled, drop)
    nt, nm, npool = model.null_condition(1, text.shape[1])
    assert torch.equal(t2[1], text[1]) and torch.equal(m2[1], mask[1]) and torch.equal(p2[1], pooled[1])
    assert torch.equal(t2[0], nt[0]) and torch.equal(m2[0], nm[0]) and torch.equal(p2[0], npool[0])


def test_extra_input_channels_start_as_base_model():
    base = _randomize(build_denoiser("tiny"))
    inpaint = build_denoiser("tiny", extra_in_channels=5)
    state = {k: v for k, v in base.state_dict().items() if k != "patch.weight"}
    inpaint.load_state_dict(state, strict=False)
    with torch.no_grad():
        inpaint.patch.weight[:, :4] = base.patch.weight
    assert torch.count_nonzero(inpaint.patch.weight[:, 4:]) == 0
    x, t, text, mask, pooled = _inputs()
    extra = torch.randn(2, 5, 16, 16)
    torch.testing.assert_close(inpaint.eval()(x, t, text, mask, pooled, mask_latent=extra),
                               base(x, t, text, mask, pooled))
    with pytest.raises(ValueError, match="extra input channels"):
        inpaint(x, t, text, mask, pooled)


def test_class_conditional_model():
    model = _randomize(build_denoiser("tiny", text_dim=0, pooled_dim=0, num_classes=10))
    x = torch.randn(2, 4, 16, 16)
    t = torch.rand(2)
    a = model(x, t, labels=torch.tensor([1, 2]))
    b = model(x, t, labels=torch.tensor([1, 10]))  # 10 = null class
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="labels"):
        model(x, t)


def test_bad_inputs_give_clear_errors():
    model = build_denoiser("tiny")
    x, t, text, mask, pooled = _inputs(h=15, w=16)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(x, t, text, mask, pooled)
    x, t, text, mask, pooled = _inputs()
    with pytest.raises(ValueError, match="dim 7"):
        model(x, t, torch.randn(2, 6, 7), mask, pooled)
    with pytest.raises(ValueError, match="pooled"):
        model(x, t, text, mask, None)


def test_fully_masked_row_is_finite():
    model = _randomize(build_denoiser("tiny"))
    x, t, text, mask, pooled = _inputs()
    mask[0] = False
    assert torch.isfinite(model(x, t, text, mask, pooled)).all()


def test_position_embedding_interpolates_base_grid():
    model = build_denoiser("tiny")  # base_size 8, patch 2 -> 4x4 base tokens
    base = model.pos_embed(4, 4, torch.device("cpu"), torch.float32)
    double = model.pos_embed(8, 8, torch.device("cpu"), torch.float32)
    # every other token of the 2x grid sits exactly on a base-grid coordinate
    torch.testing.assert_close(double.view(8, 8, -1)[::2, ::2].reshape(16, -1), base)
    wide = model.pos_embed(4, 8, torch.device("cpu"), torch.float32)  # wider canvas extends
    torch.testing.assert_close(wide.view(4, 8, -1)[:, :4].reshape(16, -1), base)
    assert sincos_2d(64, 3, 5, 1.0).shape == (15, 64)


def test_training_step_reaches_every_parameter():
    model = build_denoiser("tiny", mlp="dwconv")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t, text, mask, pooled = _inputs()
    for _ in range(3):  # zero-init output, then zero gates: by step 3 gradients reach everything
        opt.zero_grad()
        loss = (model(x, t, text, mask, pooled) - torch.randn_like(x)).pow(2).mean()
        loss.backward()
        opt.step()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == ["null_text", "null_pooled"]  # only reached when a row is dropped


def test_bf16_autocast_close_to_fp32():
    model = _randomize(build_denoiser("tiny"))
    x, t, text, mask, pooled = _inputs()
    ref = model(x, t, text, mask, pooled)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, text, mask, pooled).float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_head_norm_matches_its_definition(kind):
    from latentdit.model import HeadNorm

    norm = HeadNorm(8, kind)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 5, 8) * 4 + 1
    centred = x - x.mean(-1, keepdim=True) if kind == "layer" else x
    denom = (centred.var(-1, unbiased=False, keepdim=True) if kind == "layer"
             else x.pow(2).mean(-1, keepdim=True))
    expected = centred / torch.sqrt(denom + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)
    # gradients agree with torch's own norms, and stay finite on an all-zero head
    ref_fn = F.layer_norm if kind == "layer" else F.rms_norm
    x = torch.cat([x, torch.zeros(3, 1, 8)], dim=1).requires_grad_(True)
    mine, = torch.autograd.grad((norm(x) * torch.arange(8.0)).sum(), x)
    ref, = torch.autograd.grad((ref_fn(x, (8,), norm.weight, eps=1e-6) * torch.arange(8.0)).sum(), x)
    assert torch.isfinite(mine).all()
    torch.testing.assert_close(mine, ref, atol=1e-3, rtol=1e-4)
    low = x.detach().bfloat16()
    assert norm(low).dtype == torch.bfloat16
    torch.testing.assert_close(norm(low).float(), ref_fn(low.float(), (8,), norm.weight, eps=1e-6),
                               atol=0.05, rtol=0.02)


def test_explicit_attention_matches_sdpa_in_bf16():
    import torch.nn.functional as F

    from latentdit.model import attend

    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., 6:] = False
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    torch.testing.assert_close(attend(q, k, v, mask).float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(attend(q.float(), k.float(), v.float(), mask), ref)


def test_modulate_is_scale_and_shift():
    from latentdit.model import modulate

    x, shift, scale = torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale) + shift)


@pytest.mark.parametrize("row,name", [(0, "attention shift"), (1, "attention scale"), (2, "attention gate"),
                                      (3, "MLP shift"), (4, "MLP scale"), (5, "MLP gate")])
def test_every_adaln_modulation_row_reaches_the_output(row, name):
    """adaLN-single: each block's six modulation vectors (shift, scale, gate for attention and for
    the MLP) must each change what the denoiser predicts; a block that drops shift or scale
    still trains but draws visibly broken images."""
    model = _randomize(build_denoiser("tiny"))
    x, t, text, mask, pooled = _inputs()
    with torch.no_grad():
        before = model(x, t, text, mask, pooled)
        for block in model.blocks:
            block.table[row] += 0.5
        after = model(x, t, text, mask, pooled)
    assert (after - before).abs().max() > 1e-3, f"the {name} does not reach the output"


def test_text_refiner_starts_as_identity_and_lets_text_tokens_read_each_other():
    plain = _randomize(build_denoiser("tiny"))
    refined = build_denoiser("tiny", text_refiner=2)
    missing = refined.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k == "text_pos" or k.startswith("text_refiner.") for k in missing)
    x, t, text, mask, pooled = _inputs()
    torch.testing.assert_close(refined.eval()(x, t, text, mask, pooled), plain(x, t, text, mask, pooled))
    _randomize(refined)
    ctx, m = refined._text_tokens(text, mask)
    # token 0's state depends on token 1 (self-attention) and on its own place (positions)...
    text2 = text.clone()
    text2[:, 1] += 1.0
    assert not torch.allclose(refined._text_tokens(text2, mask)[0][:, 0], ctx[:, 0], atol=1e-4)
    swapped = text[:, [1, 0, *range(2, text.shape[1])]]
    assert not torch.allclose(refined._text_tokens(swapped, mask)[0][:, 1], ctx[:, 0], atol=1e-4)
    # ...but never on masked pads, so padding still leaves the output alone
    garbage = torch.cat([text, torch.randn(2, 3, 32) * 100], 1)
    padded = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    torch.testing.assert_close(refined(x, t, garbage, padded, pooled), refined(x, t, text, mask, pooled),
                               atol=1e-5, rtol=1e-5)


def test_text_refiner_bad_configs_and_inputs_are_named():
    with pytest.raises(ValueError, match="text_refiner"):
        build_denoiser("tiny", text_refiner=-1)
    with pytest.raises(ValueError, match="text_refiner.*text_dim"):
        build_denoiser("tiny", text_dim=0, text_refiner=1)
    model = build_denoiser("tiny", text_refiner=1)
    x, t, _, _, pooled = _inputs()
    n = model.config.max_text_len + 1
    with pytest.raises(ValueError, match=f"{n} text tokens.*max_text_len"):
        model(x, t, torch.randn(2, n, 32), torch.ones(2, n, dtype=torch.bool), pooled)
