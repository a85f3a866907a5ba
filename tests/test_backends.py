"""The backend objects: which one ``auto`` picks, and what each lends the engine and the step."""

from __future__ import annotations

import pytest
import torch

import fastdp
import fastdp.backends as backends
from fastdp.backends.compiled import CompiledBackend
from fastdp.backends.triton import TritonBackend


@pytest.fixture
def gpu_machine(monkeypatch):
    """This machine as if it also had a GPU with both GPU backends (their kernels are never called here)."""
    available = dict(backends._AVAILABLE)
    available["triton"] = TritonBackend(device_type="cuda")
    available["cuda"] = CompiledBackend("cuda", "cuda")
    monkeypatch.setattr(backends, "_AVAILABLE", available)
    monkeypatch.delenv("FASTDP_BACKEND", raising=False)


def test_auto_picks_by_the_parameters_device(gpu_machine):
    cpu_best = "cpp" if "cpp" in backends._AVAILABLE else "torch"
    assert backends.resolve_backend("auto").name == "triton"  # the best on the machine
    assert backends.resolve_backend("auto", device="cuda:1").name == "triton"
    assert backends.resolve_backend("auto", device="cpu").name == cpu_best  # a CPU model on a GPU machine
    eng = fastdp.GradSampleEngine(torch.nn.Linear(3, 2), max_grad_norm=1.0)
    assert eng.backend.name == cpu_best
    opt = fastdp.DPSGD(torch.nn.Linear(3, 2), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2)
    assert opt.backend.name == opt.engine.backend.name == cpu_best


def test_each_backend_lends_what_it_has():
    torch_backend = backends.resolve_backend("torch")
    assert torch_backend.reducer() is None and torch_backend.layer_kernels() is None
    p = torch.nn.Parameter(torch.zeros(3))
    assert torch_backend.fused_step(torch.optim.SGD([p], lr=0.1), [p]) is None
    triton = TritonBackend(device_type="cuda")
    # float64 and dampening are not the Triton step's: the torch path takes them
    q = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    assert not triton.step_takes(torch.optim.SGD([q], lr=0.1), [q])
    assert not triton.step_takes(torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.1), [p])
    if "cpp" in fastdp.available_backends():
        cpp = backends.resolve_backend("cpp")
        # on the CPU the compiled kernels lend the shifted ghost norm's Gram sum only: no fused_* strategy
        kernels = cpp.layer_kernels()
        assert cpp.reducer() is not None and kernels.device_type == "cpu" and kernels.shifted_gram is not None
        fields = ("linear_norm", "linear_ghost_norm", "linear_bookkeeping", "conv2d_norm", "conv2d_bookkeeping",
                  "conv2d_ghost_norm")  # fmt: skip
        assert all(getattr(kernels, f) is None for f in fields)
        assert cpp.fused_step(torch.optim.Adam([p]), [p]) is not None
        assert cpp.fused_step(torch.optim.Adam([p], amsgrad=True), [p]) is None  # not a kernel's update
        assert cpp.fused_step(torch.optim.RMSprop([p]), [p]) is None


def test_float64_model_takes_the_torch_path_with_one_warning(monkeypatch):
    """The Triton kernels take fp32/bf16/fp16: a float64 model asked to run on them (here the interpreted backend, as
    under TRITON_INTERPRET=1) plans only torch strategies, reduces in torch and steps on the torch path, with one
    warning that the step does, and computes exactly what backend="torch" computes."""
    import warnings

    from torch import nn

    monkeypatch.setitem(backends._AVAILABLE, "triton", TritonBackend(device_type="cpu", interpreted=True))

    def train(backend: str) -> tuple[list[torch.Tensor], list[str]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
        opt = fastdp.DPSGD(
            model, lr=0.1, momentum=0.9, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
            backend=backend, seed=7, autotune=False,
        )  # fmt: skip
        gen = torch.Generator().manual_seed(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                x = torch.randn(4, 2, 6, 6, generator=gen, dtype=torch.float64)
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
        assert all(choice in ("keep", "ghost", "instantiate_bk", "unfold", "unfold_bk", "shifted_ghost")
                   for _, choice in opt.engine.plans.values()), opt.engine.plans  # fmt: skip
        return [p.detach().clone() for p in model.parameters()], [str(w.message) for w in caught]

    expected, quiet = train("torch")
    got, said = train("triton")
    assert not quiet
    assert len(said) == 1 and "torch path" in said[0], said
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
