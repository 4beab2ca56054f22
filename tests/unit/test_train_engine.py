"""train/engine.py: the objective registry, the learning-rate schedule against its closed form, gradient
clipping, resume after a simulated kill equal to an uninterrupted run, bit for bit, and the progress bar's
time left (the mean step time after the slow first steps)."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
import torch

from cliplab.errors import CliplabError
from cliplab.train.engine import (
    STATE_FILE,
    TrainOptionError,
    TrainSettings,
    get_objective,
    list_objectives,
    read_checkpoint,
    register_objective,
    run_training,
    scheduled_lr,
    steady_eta,
)

X = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
Y = X @ torch.randn(6, 1, generator=torch.Generator().manual_seed(1))


def _net() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def _data(epoch, start=0):
    """Seeded by the epoch: 5 batches of 8 rows."""
    order = np.random.default_rng([7, epoch]).permutation(len(X))
    for b in range(start, 5):
        idx = torch.from_numpy(order[b * 8:(b + 1) * 8])
        yield {"x": X[idx], "y": Y[idx]}


def _noisy_mse(module, batch):
    """Dropout and a noise draw: both come from torch's RNG, which the engine seeds per step."""
    out = module(batch["x"]) + 0.01 * torch.randn(len(batch["x"]), 1)
    return torch.nn.functional.mse_loss(out, batch["y"]), {}


def test_registry_lists_builtins_and_refuses_unknown_names_in_one_line():
    names = list_objectives()
    assert {"clip", "siglip", "clipn"} <= set(names) and names == sorted(names)
    with pytest.raises(TrainOptionError) as info:
        get_objective("triplet")
    message = str(info.value)
    assert "\n" not in message and "'triplet'" in message and all(n in message for n in names)

    @register_objective("test-constant")
    class Constant:
        def __init__(self, value=1.0):
            self.value = value

        def __call__(self, module, batch):
            return torch.tensor(self.value), {}

    assert get_objective("test-constant", value=2.0).value == 2.0
    with pytest.raises(TrainOptionError, match="test-constant"):
        get_objective("test-constant", nope=1)


def test_step_schedule_is_linear_warmup_then_cosine_to_zero():
    s = TrainSettings(steps=100, lr=2.0, warmup_steps=10)
    for t in (0, 4, 9):
        assert scheduled_lr(s, t) == pytest.approx(2.0 * (t + 1) / 10)
    for t in (10, 37, 55, 99):
        assert scheduled_lr(s, t) == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - 10) / 90)) * 2.0)
    assert scheduled_lr(TrainSettings(steps=5, lr=1.0, schedule="constant"), 4) == 1.0


def test_epoch_schedule_is_dassl_constant_warmup_then_cosine_over_max_epoch():
    s = TrainSettings(epochs=50, lr=0.002, optimizer="sgd", warmup="constant", warmup_steps=1, warmup_lr=1e-5)
    assert scheduled_lr(s, 0) == 1e-5
    for e in (1, 2, 25, 49):
        assert scheduled_lr(s, e) == pytest.approx(0.001 * (1 + math.cos(math.pi * (e - 1) / 50)))


def test_lr_reaches_the_optimizer_at_each_step():
    seen = []

    def record(module, batch):
        return module(batch["x"]).pow(2).mean(), {}

    settings = TrainSettings(steps=7, lr=0.1, warmup_steps=3, optimizer="sgd", progress=False, device="cpu")
    net = torch.nn.Linear(6, 1)
    original = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *a, **k)

    torch.optim.SGD.step = spy
    try:
        run_training(net, record, _data, settings)
    finally:
        torch.optim.SGD.step = original
    assert seen == pytest.approx([scheduled_lr(settings, t) for t in range(7)])


def test_gradient_norm_is_clipped():
    net = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    before = net.weight.detach().clone()
    x = torch.tensor([[100.0, -50.0, 20.0]])

    def linear(module, batch):
        return module(batch).sum(), {}  # gradient = x, norm about 113.6

    settings = TrainSettings(steps=1, lr=0.5, optimizer="sgd", momentum=0.0, schedule="constant", grad_clip=2.0,
                             progress=False, device="cpu")
    run_training(net, linear, lambda epoch: [x], settings)
    expected = before - 0.5 * x * (2.0 / x.norm())  # w - lr * g * clip / ||g||
    assert torch.allclose(net.weight, expected, atol=1e-5)


@pytest.mark.parametrize("shape", ["steps", "epochs"])
def test_resume_after_a_kill_equals_an_uninterrupted_run_bit_for_bit(shape, tmp_path):
    common = dict(lr=0.01, warmup_steps=2, weight_decay=0.01, grad_clip=1.0, seed=5, progress=False, device="cpu",
                  checkpoint_every=3, eval_every=2)
    settings = TrainSettings(steps=13, **common) if shape == "steps" else TrainSettings(epochs=3, **common)

    def held_out():
        with torch.no_grad():
            return {"mse": float(torch.nn.functional.mse_loss(whole(X), Y))}

    whole = _net()
    reference = run_training(whole, _noisy_mse, _data, settings.__class__(**{**vars(settings),
                                                                             "checkpoint_dir": tmp_path / "a"}),
                             evaluate=held_out)

    killed_settings = settings.__class__(**{**vars(settings), "checkpoint_dir": tmp_path / "b"})

    def kill(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(_net(), _noisy_mse, _data, killed_settings, callback=kill)
    state = read_checkpoint(tmp_path / "b" / STATE_FILE)
    assert (state["step"], state["epoch"], state["position"]) == (6, 1, 1)

    resumed_net = _net()
    resumed = run_training(resumed_net, _noisy_mse, _data, killed_settings)
    assert resumed.resumed_from == 6 and resumed.steps == reference.steps == (13 if shape == "steps" else 15)
    for (name, a), b in zip(whole.state_dict().items(), resumed_net.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.last_loss == reference.last_loss
    # a different seed gives different weights (the comparison above can fail)
    other = _net()
    run_training(other, _noisy_mse, _data, TrainSettings(**{**vars(settings), "seed": 6}))
    assert not torch.equal(other[0].weight, whole[0].weight)


def test_resume_without_a_start_argument_skips_batches(tmp_path):
    settings = TrainSettings(epochs=2, lr=0.01, seed=1, progress=False, device="cpu", checkpoint_every=2,
                             checkpoint_dir=tmp_path / "s")

    def data(epoch):  # no start: the engine skips the batches done
        return list(_data(epoch))

    whole = _net()
    run_training(whole, _noisy_mse, data, TrainSettings(**{**vars(settings), "checkpoint_dir": None}))

    def kill(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(_net(), _noisy_mse, data, settings, callback=kill)
    resumed = _net()
    run_training(resumed, _noisy_mse, data, settings)
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))


def test_resume_with_other_options_is_refused_naming_them(tmp_path):
    settings = TrainSettings(steps=2, lr=0.01, progress=False, device="cpu", checkpoint_dir=tmp_path)
    run_training(_net(), _noisy_mse, _data, settings)
    with pytest.raises(TrainOptionError, match=r"lr 0\.01 -> 0\.02"):
        run_training(_net(), _noisy_mse, _data, TrainSettings(**{**vars(settings), "lr": 0.02}))
    with pytest.raises(TrainOptionError, match="source"):
        run_training(_net(), _noisy_mse, _data, TrainSettings(**{**vars(settings), "identity": '{"source": "b"}'}))
    # options that do not change the result may differ
    run_training(_net(), _noisy_mse, _data, TrainSettings(**{**vars(settings), "eval_every": 1, "desc": "again"}))
    (tmp_path / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(CliplabError, match="unreadable training checkpoint"):
        run_training(_net(), _noisy_mse, _data, settings)


def test_checkpoints_by_time(tmp_path):
    settings = TrainSettings(steps=4, lr=0.01, progress=False, device="cpu", checkpoint_dir=tmp_path,
                             checkpoint_seconds=1e-9)

    def kill(step, loss):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(_net(), _noisy_mse, _data, settings, callback=kill)
    assert read_checkpoint(tmp_path / STATE_FILE)["step"] == 1


def test_frozen_parts_stay_fixed_and_in_eval_mode_and_bf16_runs():
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    net[0].requires_grad_(False)
    net[1].requires_grad_(False)
    frozen = {k: v.clone() for k, v in net[:2].state_dict().items()}
    head = net[2].weight.detach().clone()

    def mse(module, batch):
        return torch.nn.functional.mse_loss(module(batch["x"]).float(), batch["y"]), {}

    result = run_training(net, mse, _data, TrainSettings(steps=3, lr=0.1, precision="bf16", progress=False,
                                                         device="cpu"))
    assert math.isfinite(result.last_loss)
    for key, value in net[:2].state_dict().items():  # BN running statistics included: it ran in eval mode
        assert torch.equal(value, frozen[key]), key
    assert not torch.equal(net[2].weight, head)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(TrainOptionError, match="exactly one"):
        TrainSettings()
    with pytest.raises(TrainOptionError, match="optimizer"):
        TrainSettings(steps=1, optimizer="lion")
    with pytest.raises(TrainOptionError, match="nothing to train"):
        run_training(torch.nn.Linear(2, 2).requires_grad_(False), _noisy_mse, _data,
                     TrainSettings(steps=1, progress=False, device="cpu"))


def test_clip_and_siglip_objectives_are_the_written_out_losses(tiny):
    model = tiny.derive("objective-test", trainable=True)
    model.model.logit_bias = torch.nn.Parameter(torch.tensor(-3.0))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = model.tokenize(["a cat", "a dog"])
    index = torch.tensor([0, 1, 1, 0])  # images 1 and 2 share a caption, as do 0 and 3
    batch = {"images": images, "tokens": tokens, "text_index": index}
    with torch.no_grad():
        i = torch.nn.functional.normalize(model.model.encode_image(images), dim=-1)
        t = torch.nn.functional.normalize(model.model.encode_text(tokens), dim=-1)[index]
        s, b = model.model.logit_scale.exp(), model.model.logit_bias
        logits = s * i @ t.T
        target = torch.arange(4)
        ce = torch.nn.functional.cross_entropy
        clip = (ce(logits, target) + ce(logits.T, target)) / 2
        signs = 2 * torch.eye(4) - 1
        siglip = -torch.nn.functional.logsigmoid(signs * (logits + b)).sum() / 4
    got_clip, _ = get_objective("clip")(model, batch)
    got_siglip, logs = get_objective("siglip")(model, batch)
    assert got_clip.item() == pytest.approx(clip.item(), rel=1e-5)
    assert got_siglip.item() == pytest.approx(siglip.item(), rel=1e-5) and logs["logit_bias"] == -3.0
    with torch.no_grad():
        model.model.logit_scale.fill_(9.0)
    get_objective("clip").after_step(model)
    assert float(model.model.logit_scale.detach()) == pytest.approx(math.log(100))
    with pytest.raises(CliplabError, match="logit_bias"):
        get_objective("siglip")(tiny, batch)


def test_a_finished_run_resumed_trains_evaluates_and_saves_nothing(tmp_path):
    settings = TrainSettings(steps=3, lr=0.01, progress=False, device="cpu", checkpoint_dir=tmp_path)
    calls = []
    first = run_training(_net(), _noisy_mse, _data, settings, evaluate=lambda: calls.append(1) or {"m": 1.0})
    written = (tmp_path / STATE_FILE).read_bytes()
    net = _net()
    again = run_training(net, _noisy_mse, _data, settings, evaluate=lambda: calls.append(1) or {"m": 1.0})
    assert calls == [1] and again.history == first.history and again.steps == 3
    assert (tmp_path / STATE_FILE).read_bytes() == written
    assert torch.equal(net[0].weight, read_checkpoint(tmp_path / STATE_FILE)["model"]["0.weight"])


def test_steady_eta_is_the_mean_step_time_times_the_steps_left():
    assert steady_eta(10.0, 16.0, 3, 5) == pytest.approx(10.0)  # 2 s a step, 5 left
    assert steady_eta(0.0, 1.5, 1, 0) == 0.0
    assert steady_eta(4.0, 4.0, 0, 9) is None  # no step timed yet


def test_progress_bar_time_left_leaves_out_a_slow_first_step(capsys):
    """The first batch takes 2 s, the rest almost nothing: counted in, it would show over 7 s left at step 3 of 14
    (2/3 s a step x 11); left out, the 11 remaining steps at their own pace (well under 0.3 s each even on a busy
    machine) show at most 4 s."""

    def data(epoch, start=0):
        for b in range(start, 14):
            if b == 0:
                time.sleep(2.0)
            yield {"x": X[:8], "y": Y[:8]}

    run_training(_net(), _noisy_mse, data, TrainSettings(steps=14, lr=0.01, progress=True))
    shown = re.findall(r"eta=([^,\]\s]+)", capsys.readouterr().err)
    assert shown[:2] == ["?", "?"]  # the first ETA_SKIP steps are not timed
    minutes, seconds = shown[2].split(":")  # at step 3, 11 left: the slow step counted in gives >= 2/3 * 11 s
    assert int(minutes) * 60 + int(seconds) <= 4


class _Payload:
    """Unpickling this would call os.getcwd: what a hostile checkpoint does with a worse function."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_a_checkpoint_that_pickles_code_is_one_line_without_torchs_unsafe_advice(tmp_path):
    """Issue 21 item 5: the refusal names the global, never torch's advice to load with weights_only=False."""
    path = tmp_path / STATE_FILE
    torch.save({"step": 1, "payload": _Payload()}, path)
    with pytest.raises(CliplabError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and "weights_only" not in message
    assert "unreadable training checkpoint" in message and "getcwd" in message
