"""The training step's accelerator paths, reached on the CPU: multi-tensor EMA, the sync-free
skip of a non-finite step, device-side skip counters, host->device copies, gradient clipping
and the learning-rate warm-up; the loss, micro-batch accumulation, the optimiser's settings,
the shard checks and the seeded start against references written out in the tests."""

import contextlib

import pytest
import torch

from latentdit.config import model_preset
from latentdit.model import Denoiser
from latentdit.schedules import NoisePath
from latentdit.shards import Batch
from latentdit.text import TextEmbeddings
from latentdit.train import learning_rate, make_optimizer, train_step, update_ema
from latentdit.train_config import OptimConfig, TrainConfig
from latentdit.train_log import StepCounters
from latentdit.train_state import TrainState, compile_denoiser, to_device


class _Acc:
    """The slice of ``accelerate.Accelerator`` that train_step uses, for one CPU process."""

    device = torch.device("cpu")
    num_processes = 1

    def no_sync(self, model):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def _batch(nan: bool = False) -> Batch:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 3, 8, 8, generator=g)
    if nan:
        latents[0, 0, 0, 0] = float("nan")
    text = TextEmbeddings(torch.randn(4, 4, 16, generator=g), torch.ones(4, 4, dtype=torch.bool),
                          torch.randn(4, 16, generator=g))
    return Batch(latents=latents, text=text, captions=[""] * 4, index=torch.arange(4))


def _cfg(**optim) -> tuple[TrainConfig, Denoiser]:
    torch.manual_seed(0)
    mcfg = model_preset("tiny", in_channels=3, text_dim=16, pooled_dim=16, max_text_len=4, base_size=8,
                        patch_size=2)
    cfg = TrainConfig(model=mcfg, mixed_precision="no", batch_size=4,
                      optim=OptimConfig(**{"lr": 1e-3, "warmup_steps": 10, **optim}))
    return cfg, Denoiser(mcfg).train()


def _step(model, opt, cfg, batch, sync_free, step=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return train_step(_Acc(), model, opt, [batch], NoisePath("flow"), cfg, gen, step, sync_free=sync_free)


# -- EMA ----------------------------------------------------------------------------------------
def test_multi_tensor_ema_equals_the_per_parameter_ema():
    _, model = _cfg()
    ema = {n: p.detach().float().clone() + 0.5 for n, p in model.named_parameters()}
    reference = {n: v.clone() for n, v in ema.items()}
    for decay in (0.1, 0.9, 0.999):  # lerp switches formula at weight 0.5: both sides
        update_ema(ema, model, decay)
        for name, p in model.named_parameters():
            reference[name].lerp_(p.detach().float(), 1 - decay)
        assert all(torch.equal(ema[n], reference[n]) for n in ema)


def test_gated_ema_updates_only_when_the_step_was_taken():
    _, model = _cfg()
    start = {n: p.detach().float().clone() + 0.5 for n, p in model.named_parameters()}
    taken, skipped, plain = ({n: v.clone() for n, v in start.items()} for _ in range(3))
    update_ema(taken, model, 0.9, torch.tensor(True))
    update_ema(skipped, model, 0.9, torch.tensor(False))
    update_ema(plain, model, 0.9)
    assert all(torch.allclose(taken[n], plain[n], rtol=0, atol=1e-6) for n in start)
    assert any(not torch.equal(taken[n], start[n]) for n in start)
    assert all(torch.equal(skipped[n], start[n]) for n in start)


# -- the sync-free step -------------------------------------------------------------------------
@pytest.mark.parametrize("nan", [False, True])
def test_sync_free_step_matches_the_host_checked_step(nan):
    """The accelerator path (skip inside the fused optimiser through found_inf) does exactly what
    the host path does: the same update on a finite batch, nothing at all on a non-finite one."""
    results = []
    for sync_free in (False, True):
        cfg, model = _cfg()
        opt = make_optimizer(model, cfg)
        assert opt.param_groups[0].get("fused"), "fused AdamW is available on this CPU"
        _step(model, opt, cfg, _batch(), sync_free)  # a first good step creates the moments
        loss, norm, ok = _step(model, opt, cfg, _batch(nan), sync_free, seed=1)
        assert ok.dtype == torch.bool and bool(ok) is not nan
        assert not hasattr(opt, "found_inf")
        results.append((model.state_dict(), opt.state_dict()["state"]))
    (w0, s0), (w1, s1) = results
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    for idx in s0:
        assert all(torch.equal(s0[idx][k], s1[idx][k]) for k in s0[idx])
    if nan:
        assert int(s1[0]["step"]) == 1  # the skipped step does not count


def test_step_counters_count_streaks_and_stop_a_diverged_run():
    counters, state = StepCounters(torch.device("cpu")), TrainState()
    for ok in (True, False, False, True, False):
        counters.add(torch.tensor(ok))
    state.step = 5
    counters.check(state, max_bad=3)
    assert (state.bad_streak, state.bad_total) == (1, 3)
    counters.add(torch.tensor(False))
    counters.add(torch.tensor(False))
    counters.add(torch.tensor(True))  # the streak of 3 ended before the check: still caught
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row"):
        counters.check(state, max_bad=3)
    resumed = StepCounters(torch.device("cpu"), streak=2, total=7)
    resumed.add(torch.tensor(False))
    with pytest.raises(RuntimeError, match="3 non-finite"):
        resumed.check(state, max_bad=3)


def test_to_device_pins_and_copies_without_blocking(monkeypatch):
    """The CUDA branch: every tensor goes through pinned memory and a non-blocking copy."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    real_to = torch.Tensor.to

    def to(self, *args, **kw):
        calls.append(("to", str(args[0]), kw.get("non_blocking")))
        return real_to(self, "cpu")

    monkeypatch.setattr(torch.Tensor, "to", to)
    batch = _batch()
    assert to_device(batch, torch.device("cpu")) is batch
    moved = to_device(batch, torch.device("cuda:0"))
    assert calls.count("pin") == 5 and calls.count(("to", "cuda:0", True)) == 5
    assert torch.equal(moved.latents, batch.latents) and moved.captions == batch.captions
    assert moved.labels is None
    batch.labels = torch.tensor([0, 1, 2, 3])
    assert torch.equal(to_device(batch, torch.device("cuda:0")).labels, batch.labels)
    assert calls.count("pin") == 11  # the class labels travel too


def test_compile_uses_cuda_graphs_only_on_one_cuda_process(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    _, model = _cfg()
    acc = _Acc()
    assert compile_denoiser(model, acc) is False
    acc.device = torch.device("cuda")
    assert compile_denoiser(model, acc) is True
    acc.num_processes = 8
    assert compile_denoiser(model, acc) is False
    assert modes == [None, "reduce-overhead", None]


def test_sharded_parallelism_is_refused_in_one_line():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from latentdit.train_state import check_parallelism

    check_parallelism(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))
    check_parallelism(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ValueError, match=f"configured for {kind.name}.*--multi_gpu") as e:
            check_parallelism(SimpleNamespace(distributed_type=kind))
        assert "\n" not in str(e.value)


# -- clipping and warm-up -----------------------------------------------------------------------
class _Recorder:
    """An optimiser that records the gradient norm and learning rate it is stepped with."""

    def __init__(self, model, lr):
        self.params = list(model.parameters())
        self.param_groups = [{"lr": lr}]
        self.norms, self.lrs = [], []

    def step(self):
        grads = [p.grad for p in self.params if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.lrs.append(self.param_groups[0]["lr"])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def test_gradients_are_clipped_before_the_optimiser_sees_them():
    cfg, model = _cfg(grad_clip=1e-3)
    opt = _Recorder(model, cfg.optim.lr)
    _, norm, ok = _step(model, opt, cfg, _batch(), sync_free=False)
    assert bool(ok) and float(norm) > 10 * cfg.optim.grad_clip  # the raw norm is reported
    assert opt.norms[0] == pytest.approx(cfg.optim.grad_clip, rel=1e-3)


def test_learning_rate_warms_up_linearly_in_the_step():
    cfg, model = _cfg(warmup_steps=10, lr=1e-3, schedule="constant")
    assert [learning_rate(s, cfg) for s in (0, 4, 9, 10, 500)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    opt = _Recorder(model, 123.0)
    for step in (0, 4, 9):
        _step(model, opt, cfg, _batch(), sync_free=False, step=step)
    assert opt.lrs == pytest.approx([1e-4, 5e-4, 1e-3])


def test_ema_decay_warms_up_as_its_formula_then_holds():
    """min(decay, (1 + n) / (10 + n)) with warm-up (0.1 at step 0, 0.5 at step 8), the plain decay
    without it."""
    from latentdit.train import ema_decay

    warm = TrainConfig(ema_decay=0.999, ema_warmup=True)
    assert [ema_decay(n, warm) for n in (0, 8, 90)] == pytest.approx([0.1, 0.5, 0.91])
    assert ema_decay(10**6, warm) == 0.999
    assert ema_decay(0, TrainConfig(ema_decay=0.999, ema_warmup=False)) == 0.999


def test_the_log_window_averages_good_steps_only():
    from latentdit.train_log import Window

    w = Window()
    assert w.means() is None
    w.add(torch.tensor(2.0), torch.tensor(True))
    w.add(torch.tensor(float("nan")), torch.tensor(False))  # a skipped step: left out, NaN and all
    w.add(torch.tensor(4.0), torch.tensor(True))
    assert w.means() == [3.0] and w.steps == 3
    w.reset()
    w.add(torch.tensor(float("nan")), torch.tensor(False))
    assert w.means() is None  # only skipped steps: no mean (written as null)
    v = Window()
    v.add(torch.tensor([1.0, 10.0, 100.0]))
    v.add(torch.tensor([3.0, 30.0, 300.0]))
    assert v.means() == [2.0, 20.0, 200.0] and v.seconds() > 0


# -- the loss and the step, against references written out here ------------------------------------
class _Spy(torch.nn.Module):
    """Wraps a denoiser and keeps what it was called with and what it returned."""

    def __init__(self, inner: Denoiser):
        super().__init__()
        self.inner = inner
        self.calls: list[tuple] = []

    def drop_condition(self, *args):
        return self.inner.drop_condition(*args)

    def forward(self, x, t, text, mask, pooled, **extra):
        out = self.inner(x, t, text, mask, pooled, **extra)
        self.calls.append((x, t, text, mask, pooled, out))
        return out


@pytest.mark.parametrize("prediction, object_weight, fade", [("flow", 0.0, False), ("x0", 0.0, False),
                                                               ("flow", 2.0, False), ("flow", 2.0, True)])
def test_the_loss_is_the_mean_squared_error_of_its_own_draws(prediction, object_weight, fade):
    """Re-drawn in the documented order (times, shifted; noise; dropout) from a copy of the
    generator: the network sees x_t = (1 - t) x0 + t eps, the null condition exactly on the
    dropped rows, and the loss is the MSE against v = eps - x0 (flow) or x0, weighted per cell by
    ``object_weights`` (with the extra weight scaled by 1 - t when faded)."""
    from latentdit.schedules import sample_time
    from latentdit.train import diffusion_loss, object_weights

    cfg, model = _cfg()
    cfg.model.prediction = prediction
    cfg.cond_dropout = 0.5
    cfg.diffusion.time_shift = 3.0
    cfg.object_weight, cfg.object_weight_fade = object_weight, fade
    batch = _batch()
    spy = _Spy(model)
    gen = torch.Generator().manual_seed(3)
    ref = torch.Generator().manual_seed(3)
    loss = diffusion_loss(spy, batch, NoisePath("flow"), cfg, gen)

    x0 = batch.latents
    t = sample_time(4, cfg.diffusion.time_density, shift=3.0, generator=ref)
    eps = torch.randn(x0.shape, generator=ref)
    drop = torch.rand(4, generator=ref) < 0.5
    assert 0 < int(drop.sum()) < 4, "seed 3 drops some rows and keeps others"
    (x, t_seen, text, mask, pooled, out), = spy.calls
    tt = t.view(-1, 1, 1, 1)
    assert torch.equal(t_seen, t)
    assert torch.allclose(x, (1 - tt) * x0 + tt * eps, atol=1e-6)
    null_text, null_mask, null_pooled = model.null_condition(4, 4)
    for i in range(4):
        want = (null_text[i], null_mask[i], null_pooled[i]) if drop[i] else \
            (batch.text.tokens[i], batch.text.mask[i], batch.text.pooled[i])
        assert torch.equal(text[i], want[0]) and torch.equal(mask[i], want[1]) and torch.equal(pooled[i], want[2])
    target = eps - x0 if prediction == "flow" else x0
    weight = object_weights(x0, object_weight, 1 - tt if fade else 1.0) if object_weight else 1.0
    want = ((out.detach().float() - target).pow(2) * weight).mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-6)


def test_no_dropout_keeps_every_prompt():
    from latentdit.train import diffusion_loss

    cfg, model = _cfg()
    cfg.cond_dropout = 0.0
    batch = _batch()
    spy = _Spy(model)
    diffusion_loss(spy, batch, NoisePath("flow"), cfg, torch.Generator().manual_seed(0))
    (_, _, text, mask, pooled, _), = spy.calls
    assert torch.equal(text, batch.text.tokens) and torch.equal(pooled, batch.text.pooled)


def test_micro_batches_accumulate_to_their_mean_loss_and_gradient():
    """Two micro-batches: the step reports the mean of their losses, and the gradient it clips is
    that of the mean (the draws follow one generator through both, in order)."""
    from latentdit.train import diffusion_loss

    cfg, model = _cfg(grad_clip=1e9)
    halves = [_batch(), _batch()]
    for b, k in zip(halves, (0.5, 2.0)):  # two different halves
        b.latents.mul_(k)
    ref_model = Denoiser(cfg.model).train()
    ref_model.load_state_dict(model.state_dict())
    ref_gen = torch.Generator().manual_seed(5)
    losses = [diffusion_loss(ref_model, b, NoisePath("flow"), cfg, ref_gen) for b in halves]
    ((losses[0] + losses[1]) / 2).backward()
    ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref_model.parameters()]))

    opt = _Recorder(model, cfg.optim.lr)
    total, norm, ok = train_step(_Acc(), model, opt, halves, NoisePath("flow"), cfg,
                                 torch.Generator().manual_seed(5), 20, sync_free=False)
    assert bool(ok)
    assert float(total) == pytest.approx(float((losses[0] + losses[1]).detach() / 2), rel=1e-5)
    assert float(norm) == pytest.approx(float(ref_norm), rel=1e-4)
    assert all(p.grad is None for p in model.parameters()), "the step clears the gradients"


def test_the_optimiser_takes_its_settings_from_the_config():
    cfg, model = _cfg(lr=3e-4, weight_decay=0.07, beta1=0.8, beta2=0.95)
    opt = make_optimizer(model, cfg)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW) and group["fused"]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (3e-4, 0.07, (0.8, 0.95))
    assert len(group["params"]) == len(list(model.parameters()))


def _reader(**over):
    from types import SimpleNamespace

    manifest = {"text_dim": 16, "pooled_dim": 16, "latent_shape": [3, 8, 8], "text_encoder": {"name": "enc"}}
    manifest.update(over.pop("manifest", {}))
    return SimpleNamespace(manifest=manifest, directory="SHARDS", num_classes=over.get("num_classes", 0),
                           control=over.get("control"))


_CLASSES = {"num_classes": 5, "text_dim": 0, "pooled_dim": 0}


@pytest.mark.parametrize("reader, model, message", [
    (_reader(manifest={"text_dim": 32}), {},
     r"model.text_dim = 16 but the shards in SHARDS were encoded with enc \(text_dim 32\)"),
    (_reader(manifest={"pooled_dim": 8}), {}, r"model.pooled_dim = 16 .* \(pooled_dim 8\)"),
    (_reader(manifest={"latent_shape": [4, 8, 8]}), {}, "model.in_channels = 3 but the shards hold 4-channel latents"),
    (_reader(num_classes=10), _CLASSES, "model.num_classes = 5 but the shards in SHARDS hold 10 classes"),
    (_reader(), _CLASSES, "hold no class labels; preprocess with --labels"),
    (_reader(control="edges"), {"control": "silhouette", "extra_in_channels": 16},
     "model.control = 'silhouette' but the shards in SHARDS hold 'edges' maps"),
    (_reader(), {"extra_in_channels": 2}, "training knows one kind of extra input"),
])
def test_shards_that_do_not_fit_the_model_are_refused_naming_both_sides(reader, model, message):
    from dataclasses import replace

    from latentdit.train import check_data

    cfg, _ = _cfg()
    with pytest.raises(ValueError, match=message):
        check_data(reader, replace(cfg.model, **model))


@pytest.mark.parametrize("reader, model", [
    (_reader(), {}),
    (_reader(num_classes=5), _CLASSES),
    (_reader(num_classes=3), _CLASSES),  # a model may have room for more classes
    (_reader(control="edges"), {"control": "edges", "extra_in_channels": 16}),
    (_reader(manifest={"text_dim": 99, "pooled_dim": 99}, num_classes=5), _CLASSES),  # no text to check
])
def test_shards_that_fit_the_model_pass(reader, model):
    from dataclasses import replace

    from latentdit.train import check_data

    cfg, _ = _cfg()
    check_data(reader, replace(cfg.model, **model))


def test_the_start_follows_the_seed_and_nothing_else():
    """The initial weights and the training draws depend on ``seed`` (and the rank) only, not on
    what ran before in the process; another seed or rank gives others."""
    from dataclasses import replace

    from latentdit.train import _setup

    class Rank(_Acc):
        def __init__(self, index):
            self.process_index = index

    def start(seed, rank=0):
        cfg, _ = _cfg()
        torch.manual_seed(1234 + seed + 17 * rank)  # whatever ran before
        model, ema, _, state = _setup(replace(cfg, seed=seed), _reader(), Rank(rank), None)
        draw = torch.rand(3, generator=state.generator)
        return model.state_dict(), ema, draw

    (w0, e0, d0), (w1, _, d1), (w2, _, d2), (w3, _, d3) = start(0), start(0), start(1), start(0, rank=1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0) and torch.equal(d0, d1)
    assert all(torch.equal(e0[k], w0[k].float()) for k in e0), "the EMA starts at the weights"
    assert not torch.equal(w0["patch.weight"], w2["patch.weight"]) and not torch.equal(d0, d2)
    assert all(torch.equal(w0[k], w3[k]) for k in w0), "every rank starts from the same weights"
    assert not torch.equal(d0, d3), "each rank draws its own noise"


def test_the_inpainting_variants_boxes_follow_the_runs_generator():
    """The variant's training boxes come from the loss's generator: the same generator gives the
    same mask channels whatever the global stream holds, another seed gives others."""
    from dataclasses import replace

    from latentdit.train import diffusion_loss

    cfg, _ = _cfg()
    cfg.model = replace(cfg.model, extra_in_channels=cfg.model.in_channels + 1)
    torch.manual_seed(0)
    spy = _Spy(Denoiser(cfg.model))
    seen = []
    spy.forward = lambda x, t, text, mask, pooled, **extra: seen.append(extra["mask_latent"]) or x
    for global_seed, seed in ((1, 0), (2, 0), (1, 7)):
        torch.manual_seed(global_seed)
        diffusion_loss(spy, _batch(), NoisePath("flow"), cfg, torch.Generator().manual_seed(seed))
    assert seen[0].shape[1] == cfg.model.in_channels + 1
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
