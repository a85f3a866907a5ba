"""A copy of a wrapped model is a plain model (fastdp.engine.wrapping): copy.deepcopy, AveragedModel and pickling
give the module classes' own forwards, no-op hooks and parameters of their own, and the original stays private."""

from __future__ import annotations

import copy
import gc
import io
import warnings
import weakref

import pytest
import torch
from conftest import reference, row_loss, seed_of
from models import Conv2dNet, SharedNet
from torch import nn

from fastdp.engine import GradSampleEngine
from fastdp.engine.wrapping import Forward, Hook
from fastdp.models import build_model


def _vit_mini() -> nn.Module:
    # cls_token and pos_embed on the root: the owned-parameters path wraps the root's forward too
    return build_model("vit-mini", num_classes=3, in_channels=3, image_size=8)


MODELS = {
    "conv2d": (Conv2dNet, lambda n: Conv2dNet.inputs(n)),
    "fallback": (SharedNet, lambda n: SharedNet.inputs(n)),
    "owned-params": (_vit_mini, lambda n: (torch.randn(n, 3, 8, 8), torch.randn(n, 3))),
}


def _wrapped(name: str, max_grad_norm: float = 1.0):
    build, inputs = MODELS[name]
    model = build()
    plain = copy.deepcopy(model)  # before fastdp attaches: the reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning
        eng = GradSampleEngine(model, max_grad_norm=max_grad_norm, loss_reduction="sum")
    return model, plain, eng, inputs


def _leftovers(model: nn.Module) -> list[str]:
    """What of fastdp's wrapping a model carries: wrapped forwards and live engine hooks."""
    found = []
    for name, m in model.named_modules():
        if isinstance(vars(m).get("forward"), Forward):
            found.append(f"{name or 'model'}.forward")
        for kind in ("_forward_pre_hooks", "_forward_hooks"):
            found += [f"{name or 'model'}.{kind}" for h in getattr(m, kind).values() if isinstance(h, Hook)]
    return found


@pytest.mark.parametrize("name", list(MODELS))
def test_a_deep_copy_is_a_plain_model_with_its_own_gradients(name):
    torch.manual_seed(seed_of(f"copy-{name}"))
    model, plain, eng, inputs = _wrapped(name)
    assert _leftovers(model)  # the original is wrapped (the check below can fail)
    twin = copy.deepcopy(model)
    assert _leftovers(twin) == []
    x, t = inputs(3)
    # the copy trains as a plain model: ordinary gradients, equal to plain torch's, and nothing reaches the engine
    row_loss(twin(x), t).sum().backward()
    row_loss(plain(x), t).sum().backward()
    for (n, p), q in zip(twin.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    assert eng._pass is None and eng.summed == {}
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
    eng.detach()


@pytest.mark.parametrize("name", list(MODELS))
def test_the_original_stays_private_after_a_copy(name):
    torch.manual_seed(seed_of(f"copy-private-{name}"))
    model, plain, eng, inputs = _wrapped(name, max_grad_norm=0.3)
    twin = copy.deepcopy(model)
    x, t = inputs(4)
    ref, _ = reference(plain, x, t, max_grad_norm=0.3)
    row_loss(model(x), t).sum().backward()
    summed, _ = eng.pop()
    for n, p in model.named_parameters():
        torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=1e-7)
    assert all(p.grad is None for p in twin.parameters())


def test_a_copy_does_not_keep_the_engine_alive():
    """The copy shares nothing with the engine: before, its forwards closed over the original engine and its hooks
    held a deep copy of it."""
    model, _, eng, _ = _wrapped("conv2d")
    twin = copy.deepcopy(model)
    ref = weakref.ref(eng)
    del model, eng
    gc.collect()
    assert ref() is None
    assert twin(Conv2dNet.inputs(2)[0]).shape[0] == 2


def test_averaged_model_of_a_dp_trained_model():
    """torch.optim.swa_utils.AveragedModel deep-copies the model it averages: it averages the DP-trained weights and
    evaluates and trains as a plain model, while the optimizer's model stays private."""
    import fastdp

    torch.manual_seed(seed_of("averaged-model"))
    model = Conv2dNet()
    opt = fastdp.DPSGD(model, lr=0.1, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    avg = torch.optim.swa_utils.AveragedModel(model)
    assert _leftovers(avg) == []
    x, t = Conv2dNet.inputs(4)
    before = [p.detach().clone() for p in model.parameters()]
    avg.update_parameters(model)  # the first update copies the weights
    row_loss(model(x), t).mean().backward()
    opt.step()
    avg.update_parameters(model)
    for a, p, b in zip(avg.module.parameters(), model.parameters(), before, strict=True):
        torch.testing.assert_close(a, (p + b) / 2)  # the mean of the initial and the stepped weights
    with torch.no_grad():
        assert torch.isfinite(avg(x)).all()
    row_loss(avg(x), t).sum().backward()  # a plain model's backward
    assert all(p.grad is not None for p in avg.module.parameters())


def test_pickling_the_wrapped_model_saves_a_plain_one():
    torch.manual_seed(seed_of("pickle-wrapped"))
    model, plain, eng, _ = _wrapped("owned-params")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert _leftovers(loaded) == [] and _leftovers(model)
    x, t = MODELS["owned-params"][1](3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), plain(x))
    row_loss(loaded(x), t).sum().backward()
    row_loss(plain(x), t).sum().backward()
    for p, q in zip(loaded.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    eng.detach()
