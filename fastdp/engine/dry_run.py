"""The Triton kernel launches a training step would make on a GPU, enumerated on the CPU without computing anything.

What the compile check (kernels/_compile_check.py) builds: every kernel signature a preset's model can launch, not
a hand-written sample. ``step_launches`` runs one model like this:

1. The model is built and run forward under ``FakeTensorMode`` (shapes, strides and dtypes, no data, no memory)
   at the micro-batch's real size, under CPU autocast for bf16/fp16 (the rules read the compute dtype from
   ``torch.get_autocast_dtype``, whose value is the same on a GPU). The engine itself wraps the model
   (``GradSampleEngine``, torch backend) and its probe hook (``engine._recorder``) hands over every wrapped layer
   call with its input, so the layers and calls are the engine's own.
2. For each call, every strategy its rule offers with the Triton backend's layer kernels runs the way the engine
   runs it: ``rule.prepare``, ``rule.compute`` (LayerFunction's forward), ``rule.contributions`` on an output
   gradient of the output's dtype and strides (LayerFunction's backward), then the squared norms and the clipped sum
   through the backend's clip-and-reduce (``_finalize``; the autotuner's ``Planner._time`` runs the same sequence).
   A non-finite example needs no pass of its own: it only gets weight 0, which every clipped sum reads the same way.
   All offered strategies, not the one a plan would pick: autotuning launches every shortlisted candidate, and the
   pick depends on timings and the memory budget (the conv ghost norms are left out: they reach no kernel).
3. The fused optimizer step (``Backend.fused_step``) runs twice on meta parameters with the preset's optimizer, so
   both phases of SGD momentum (the first step creates the buffers) are seen, for noise seeds whose 32-bit words
   take each integer type Triton gives them (``SEEDS``).

The Triton host wrappers run for real, down their GPU path, with their kernels replaced by recorders
(fastdp.kernels._launches), so a launch records exactly the arguments the wrapper chose for those shapes.

Why the enumeration is complete for the presets: every kernel launch of a step goes through a host wrapper of the
``triton`` backend (``TritonBackend.reducer``, ``layer_kernels``, ``noisy_step``), which the engine reaches only
from the places re-run above (the layer's forward and backward, the finalize, the plan's timings, the step); each
wrapped call of the forward is visited, and each strategy the rule offers for it. What can still differ at run
time is dim 0: a Poisson micro-batch holds any number of examples, and Triton specialises integer arguments by
value 1 and divisibility by 16, so ``BATCHES`` takes one size of each class (256 examples and 255; a micro-batch of
one example). tests/test_dry_run.py checks the method against the real engine: a DP training step with a recording
Triton backend on real CPU tensors launches nothing the dry run of that model and batch leaves out.

Assumptions, true of the presets' models: every wrapped call's input has N * m rows (m rows per example; no layer
gets a shared input, which the engine would expand to N * K rows: checked here), no parameter is used by two calls
in one forward (whose per-example gradients ``_finalize`` would sum before the clip-and-reduce), and the optimizer
step updates every trainable parameter with one sum per parameter in its own dtype (what ``_finalize`` leaves).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextlib import nullcontext

import torch
from torch import nn

from fastdp.backends.triton import TritonBackend
from fastdp.engine.contributions import reduce_rows, reducing_with
from fastdp.engine.interface import LayerCall
from fastdp.engine.precision import full_fp32
from fastdp.rules.conv import GHOST_STRATEGIES

#: examples per micro-batch, one of each class Triton specialises dim 0 by (divisible by 16, odd, one)
BATCHES = (256, 255, 1)
#: the autocast dtypes of the forward (None: no autocast, the parameters' fp32)
PRECISIONS = (None, torch.bfloat16, torch.float16)
#: noise seeds whose 32-bit words take each of Triton's integer types (i32 below 2^31, else i64): the seed is drawn
#: from [0, 2^64), and the noisy step passes its two words to the kernel as integers (step counts stay below 2^31)
SEEDS = (1, 2**32 - 1, (2**32 - 1) << 32, 2**64 - 1)
#: (channels, side, classes) of the datasets the presets train on (fastdp/data; side None: the preset's image_size)
DATASETS = {"digits": (1, 8, 10), "cifar10": (3, 32, 10), "imagenette": (3, None, 10), "imagenet": (3, None, 1000)}


@dataclasses.dataclass(frozen=True)
class Recorded:
    """One kernel launch and where it came from."""

    label: str
    launch: object  # fastdp.kernels._launches.Launch


class _Owner:
    """What a LayerCall needs of the engine (fastdp.engine.interface.CallOwner) in the dry run."""

    def __init__(self, kernels) -> None:
        self.kernels = kernels
        self._bypass = False  # the fallback rule toggles it around its recomputation

    def record(self, call, saved, grad_out) -> None:  # pragma: no cover - LayerFunction is not used here
        raise AssertionError("the dry run calls the rules directly")


@contextlib.contextmanager
def _values_free_init() -> Iterator[None]:
    """Initialisers that read values (``trunc_normal_`` resamples until every entry is in range) made no-ops: fake
    tensors hold no values, and the launches depend on shapes and dtypes only."""
    saved = torch.nn.init.trunc_normal_
    torch.nn.init.trunc_normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        torch.nn.init.trunc_normal_ = saved


@contextlib.contextmanager
def _autocast(dtype: torch.dtype | None) -> Iterator[None]:
    with torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext():
        yield


def layer_calls(model: nn.Module, x: torch.Tensor, augmult: int) -> list[tuple[nn.Module, torch.Tensor]]:
    """Every wrapped layer call of one forward of ``model`` on ``x``, as the engine wraps the model: (module, input)."""
    from fastdp.engine.engine import GradSampleEngine

    engine = GradSampleEngine(model, max_grad_norm=1.0, augmult=augmult, backend="torch", autotune=False)
    calls: list[tuple[nn.Module, torch.Tensor]] = []

    def recorder(module, binding, forward, out_dims):
        # the engine's probe interface (fastdp.engine.provenance.Recorder): the call's tensor arguments, batch dims
        if len(binding.tensors) != 1 or binding.dims[0] != 0:
            raise ValueError(
                f"dry run: {type(module).__name__} takes {len(binding.tensors)} tensor argument(s) (batch dims "
                f"{list(binding.dims)}); only one batch-first input per call is modelled here"
            )
        calls.append((module, binding.tensors[0]))
        return forward(list(binding.tensors))

    # a container's own parameters launch no Triton kernel of their own (their small kept per-example gradients join
    # the flat buffer, modelled in _layer_launches): its class's forward runs, reading them as they are (their uses
    # are tracked by a tensor subclass, which fake tensors cannot take)
    for container in engine.owned.markers:
        del container.forward
        engine._wrapped.remove(container)
    engine._recorder = recorder
    try:
        with torch.no_grad():
            model(x)
    finally:
        engine._recorder = None
        engine.detach()
    return calls


def _structure(module: nn.Module, rule) -> object:
    """What a rule's launches depend on besides the input: the module's type, configuration and parameters (a
    fallback module: the module itself, since its subtree is opaque)."""
    from fastdp.rules import fallback_rule

    if rule is fallback_rule:
        return module
    params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in module.named_parameters(recurse=False))
    return type(module), module.extra_repr(), params


def _layer_launches(model, x, augmult, precision, backend, sink_label) -> None:
    from fastdp.rules import fallback_rule, rule_for

    examples = x.shape[0] // augmult
    owner = _Owner(backend.layer_kernels())
    reducer = backend.reducer()
    with _autocast(precision):
        calls = layer_calls(model, x, augmult)
    seen: set = set()
    for module, inp in calls:
        rule = rule_for(module) or fallback_rule
        if inp.shape[0] % examples:
            raise ValueError(
                f"dry run: {type(module).__name__} got {inp.shape[0]} rows for {examples} examples; a shared input "
                "(which the engine expands to N*K rows) is not modelled here"
            )
        m = inp.shape[0] // examples
        key = (_structure(module, rule), tuple(inp.shape), inp.stride(), inp.dtype)
        if key in seen:
            continue
        seen.add(key)
        call = LayerCall(owner, rule, module, strategy="", examples=examples, rows_per_example=m)
        with _autocast(precision):
            inp = rule.prepare(call, inp)
            strategies = list(rule.strategies(module, inp, m, owner.kernels))
        for name in strategies:
            if name in GHOST_STRATEGIES:
                # the conv ghost norms form no per-example gradient and their clipped sum is torch's weight gradient:
                # they reach no kernel, and the layer's other parameters launch under every strategy alike (the
                # shifted ghost norm is also the one slow strategy on fake tensors, ~1 s per call)
                continue
            sink_label(f"{type(module).__name__} {tuple(inp.shape[1:])} {name}")
            c = LayerCall(owner, rule, module, strategy=name, info=dict(call.info), examples=examples,
                          rows_per_example=m)  # fmt: skip
            with _autocast(precision), full_fp32() if rule.norm_reads_forward else nullcontext():
                out, saved = rule.compute(c, inp)
            grad_out = torch.empty_like(out)  # autograd's gradient of the output: its dtype and layout
            with full_fp32():
                contributions = rule.contributions(c, saved, grad_out, m)
                sq = sum(contribution.sq_norm() for _, contribution in contributions)
                # the clip weights (zero for a non-finite example: the sums select its rows away on every pass,
                # so the kernels see the same tensors whether an example was dropped or not)
                w = torch.ones_like(sq)
                with reducing_with(reducer):
                    for p, contribution in contributions:
                        contribution.weighted_sum(w).to(p.dtype)

    # the flat buffer of the small kept per-example gradients (fastdp.engine.flat): one clip-and-reduce over
    # (examples, P) fp32 columns, P the padded total of the model's small parameters; Triton specialises P (and the
    # row stride, P) only by == 1 and divisibility by 16, so a P of each class covers every model
    sink_label("flat buffer of small parameters")
    for P in (16, 20):
        with reducing_with(reducer):
            reduce_rows(torch.empty(examples, P), torch.ones(examples))


def _step_launches(model: nn.Module, optimizer: str, lr: float, momentum: float, nesterov: bool, wd: float) -> None:
    params = [nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta")) for p in model.parameters()]
    params = [p for p, q in zip(params, model.parameters(), strict=True) if q.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    elif optimizer in ("adam", "adamw"):
        opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW)(params, lr=lr, weight_decay=wd)
    else:
        return  # no fused step (e.g. nadam): the torch path
    fused = TritonBackend(device_type="meta").fused_step(opt, params)
    if fused is None:
        raise AssertionError(f"the Triton backend takes no fused step for {optimizer} on {len(params)} parameters")
    sums = {p: torch.empty_like(p) for p in params}
    for step in (0, 1):  # the first creates SGD's momentum buffers (a launch of its own), the second reads them
        for seed in SEEDS:
            fused(sums, 1.0, 256.0, seed, step)


def step_launches(
    model_fn,
    input_shape: tuple[int, ...],
    *,
    batch: int,
    augmult: int = 1,
    precision: torch.dtype | None = None,
    optimizer: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    label: str = "",
) -> list[Recorded]:
    """The Triton launches of one DP training step of ``model_fn()`` (built under fake tensors) on micro-batches of
    ``batch`` examples of ``input_shape``, ``augmult`` views each, under autocast to ``precision``, and of its
    optimizer step. Needs Triton installed, not a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastdp.kernels._launches import recording

    out: list[Recorded] = []
    where = [label]

    def sink(launch) -> None:
        out.append(Recorded(where[0], launch))

    def at(text: str) -> None:
        where[0] = f"{label} {text}"

    backend = TritonBackend(device_type="cpu")  # fake tensors are CPU tensors
    with recording(sink), _values_free_init():
        with FakeTensorMode(allow_non_fake_inputs=False):
            model = model_fn().train()
            x = torch.empty(batch * augmult, *input_shape)
            _layer_launches(model, x, augmult, precision, backend, at)
        at(f"step {optimizer} momentum {momentum}")
        with FakeTensorMode():
            model = model_fn()
        _step_launches(model, optimizer, lr, momentum, nesterov, weight_decay)
    return out


def preset_launches(
    batches: tuple[int, ...] = BATCHES,
    precisions: tuple[torch.dtype | None, ...] = PRECISIONS,
    presets: tuple[str, ...] | None = None,
) -> list[Recorded]:
    """The launches of every preset's model (fastdp.presets) at each micro-batch size and precision, with the
    preset's augmentation multiplicity, image size and optimizer."""
    from fastdp.models import build_model
    from fastdp.presets import PRESETS

    out: list[Recorded] = []
    done: set = set()
    for name, cfg in PRESETS.items():
        if presets is not None and name not in presets:
            continue
        channels, side, classes = DATASETS[cfg.dataset]
        side = side or cfg.image_size or 224
        opt = (cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay)
        for batch in batches:
            for precision in precisions:
                key = (cfg.model, channels, side, classes, cfg.augmult, opt, batch, precision)
                if key in done:  # two presets training the same model the same way
                    continue
                done.add(key)
                dt = "fp32" if precision is None else str(precision).replace("torch.", "")
                out += step_launches(
                    lambda m=cfg.model, c=channels, k=classes, s=side: build_model(
                        m, num_classes=k, in_channels=c, image_size=s
                    ),
                    (channels, side, side),
                    batch=batch, augmult=cfg.augmult, precision=precision, optimizer=cfg.optimizer, lr=cfg.lr,
                    momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                    label=f"{cfg.model}@{side} B{batch}x{cfg.augmult} {dt}",
                )  # fmt: skip
    return out
