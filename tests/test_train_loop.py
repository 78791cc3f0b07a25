"""The training step's accelerator paths, reached on the CPU: multi-tensor EMA, the sync-free
skip of a non-finite step, device-side skip counters, host->device copies, gradient clipping
and the learning-rate warm-up."""

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
