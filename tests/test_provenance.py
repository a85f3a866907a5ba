"""The batch contract: inputs without a batch dimension, the batch flattened into rows, and inputs that mix examples.

Every case is either exact against the float64 per-example loop (tests/conftest.py::reference) or refused with an
error naming the module, never silently wrong. The coincidence "a shared input has as many rows as the micro-batch"
is part of every exactness test.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import BACKENDS, reference, row_loss, run_engine, seed_of, split
from torch import nn

from fastdp.engine import GradSampleEngine
from fastdp.engine.provenance import Batched, ProvenanceError, Shared


class TinyGPT(nn.Module):
    """nanoGPT's embedding: ``wte(idx) + wpe(torch.arange(t))``, the positions shared by every example."""

    vocab, dim = 13, 6

    def __init__(self, expand_positions: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(self.vocab, self.dim)
        self.wpe = nn.Embedding(16, self.dim)
        self.ln = nn.LayerNorm(self.dim)
        self.head = nn.Linear(self.dim, 3)
        self.expand_positions = expand_positions

    def forward(self, idx):
        b, t = idx.shape
        pos = torch.arange(t, device=idx.device)
        if self.expand_positions:  # one copy of the positions per example: batched, every block the same
            pos = pos.expand(b, t)
        h = self.wte(idx) + self.wpe(pos)
        return self.head(torch.tanh(self.ln(h))).mean(1)

    @staticmethod
    def inputs(n, t):
        return torch.randint(0, TinyGPT.vocab, (n, t)), torch.randn(n, 3)


class FlatTokens(nn.Module):
    """(B, T, D) -> (B*T, D) before the only Linear: rows are tokens, T consecutive ones per example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        b, t, d = x.shape
        return self.fc(x.reshape(b * t, d)).view(b, t, 3).square().mean(1)

    @staticmethod
    def inputs(n, t=5):
        return torch.randn(n, t, 4), torch.randn(n, 3)


def _exact(model, x, t, sizes, augmult=1, backend="torch", reduction="mean"):
    """The engine over micro-batches of ``sizes`` rows against the float64 loop, about half of the examples clipped."""
    _, ref_norms = reference(model, x, t, max_grad_norm=float("inf"), augmult=augmult)
    C = ref_norms.median().item()
    ref, _ = reference(model, x, t, max_grad_norm=C, augmult=augmult)
    got, norms, _ = run_engine(
        model, split(x, t, sizes), max_grad_norm=C, augmult=augmult, backend=backend, reduction=reduction
    )
    assert (ref_norms > C).any() and (ref_norms < C).any()
    torch.testing.assert_close(norms.double(), ref_norms, rtol=2e-5, atol=1e-7)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n].double(), ref[n], rtol=2e-5, atol=2e-6 * len(ref_norms) * C)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("augmult", [1, 2])
@pytest.mark.parametrize("seq", ["t == rows", "t != rows"])
@pytest.mark.parametrize("expand_positions", [False, True])
def test_positions_without_batch_dimension_are_exact(backend, augmult, seq, expand_positions):
    torch.manual_seed(21 + augmult)
    examples = 6
    sizes = [4 * augmult, 1 * augmult, 1 * augmult]  # micro-batches of 4, 1 and 1 examples
    # the first micro-batch has 4 * K rows: t == rows is the coincidence a shape check would take for a batch
    t_len = 4 * augmult if seq == "t == rows" else 3
    model = TinyGPT(expand_positions)
    idx, target = TinyGPT.inputs(examples, t_len)
    x, tgt = idx.repeat_interleave(augmult, 0), target.repeat_interleave(augmult, 0)
    x[1::augmult] = (x[1::augmult] + 1) % TinyGPT.vocab if augmult > 1 else x[1::augmult]  # views differ
    _exact(model, x, tgt, sizes, augmult=augmult, backend=backend)


def test_probe_finds_shared_and_batched_calls():
    torch.manual_seed(22)
    model = TinyGPT()
    eng = GradSampleEngine(model, max_grad_norm=1.0)
    idx, t = TinyGPT.inputs(5, 5)
    row_loss(model(idx), t).mean().backward()
    (layout,) = eng.layouts.values()
    assert layout[(model.wpe, 0)] == (Shared(),)
    assert layout[(model.wte, 0)] == (Batched(1),)
    assert layout[(model.ln, 0)] == (Batched(1),) and layout[(model.head, 0)] == (Batched(1),)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("augmult", [1, 2])
def test_tokens_flattened_into_rows_are_clipped_per_example(backend, augmult):
    """Before: each token was clipped as an example. Now the Linear's B*T rows are T per example."""
    torch.manual_seed(23)
    model = FlatTokens()
    x, t = FlatTokens.inputs(5 * augmult)
    _exact(model, x, t, [3 * augmult, 2 * augmult], augmult=augmult, backend=backend)


class MixesExamples(nn.Module):
    """A functional batch norm between two Linears: fc2's input depends on every example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h - h.mean(0, keepdim=True))


class TokenMajor(nn.Module):
    """Tokens flattened time-major ((T, B) order): rows of one example are not consecutive."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        b, t, d = x.shape
        return self.fc(x.transpose(0, 1).reshape(t * b, d)).view(t, b, 3).mean(0)


class SharedSummed(nn.Module):
    """A shared input whose output is reduced, not broadcast: one copy per example would change the output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.proj = nn.Linear(3, 3)
        self.register_buffer("anchors", torch.randn(5, 3))

    def forward(self, x):
        return self.fc(x) + self.proj(self.anchors).sum(0)


class CopiesMixed(nn.Module):
    """Per-example copies of one tensor whose output rows then reach every example (a sum over the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.proj = nn.Linear(3, 3)

    def forward(self, x):
        copies = torch.ones(x.shape[0], 3)
        return self.fc(x) + self.proj(copies).cumsum(0)


@pytest.mark.parametrize(
    "model, inputs, match",
    [
        (MixesExamples, lambda: torch.randn(4, 4), r"fc2 \(Linear\) gets an input of shape \(4, 5\) whose rows cannot"),
        (TokenMajor, lambda: torch.randn(4, 5, 4), r"fc \(Linear\) gets an input of shape \(20, 4\) whose rows cannot"),
        (SharedSummed, lambda: torch.randn(4, 4), r"proj \(Linear\) get an input that does not come from the batch"),
        (CopiesMixed, lambda: torch.randn(4, 4), r"proj \(Linear\) gets an input of shape \(4, 3\) with 4 identical"),
    ],
)
def test_inputs_the_engine_cannot_attribute_are_refused_by_name(model, inputs, match):
    torch.manual_seed(24)
    m = model()
    GradSampleEngine(m, max_grad_norm=1.0)
    x = inputs()
    with pytest.raises(ProvenanceError, match=match):
        m(x)
    # one example has every row to itself: exact whatever the provenance, nothing to refuse
    m(x[:1]).square().sum().backward()


class TrainingOnly(nn.Module):
    """Two Linear layers with a parameter-free step between them, and after them, that mixes the examples only in
    training mode (eval mode, where the probe looks, is per example)."""

    def __init__(self, between: str = "none", after: str = "none") -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.drop = nn.Dropout(0.3)
        self.b = nn.Linear(5, 3)
        self.between, self.after = between, after

    @staticmethod
    def mix(h: torch.Tensor, how: str) -> torch.Tensor:
        if how == "center":  # batch statistics taken in training mode only
            return h - h.mean(0, keepdim=True)
        if how == "mixup":
            return 0.7 * h + 0.3 * h.roll(1, 0)
        if how == "shuffle":  # a random reordering (from a seed of its own: with 4 rows the identity is 1 in 24)
            return h[torch.randperm(h.shape[0], generator=torch.Generator().manual_seed(1))]
        if how == "swap":  # a fixed reordering of two examples that are neither the first nor the last
            return h[[0, 2, 1, *range(3, h.shape[0])]]
        if how == "one-way":  # rows 2-3 read rows 0-1, not the other way round (an example whose bits are a subset)
            return torch.cat([h[:2], h[2:4] + h[:2], h[4:]])
        return h

    def forward(self, x):
        h = self.drop(torch.tanh(self.a(x)))
        if self.training:
            h = self.mix(h, self.between)
        out = self.b(h)
        return self.mix(out, self.after) if self.training else out


@pytest.mark.parametrize("how", ["center", "mixup", "shuffle", "swap", "one-way"])
@pytest.mark.parametrize("where", ["between", "after"])
@pytest.mark.parametrize("augmult", [1, 2])
def test_a_forward_that_mixes_examples_only_in_training_mode_is_refused(how, where, augmult):
    """The probe classifies the calls in eval mode; a training forward that mixes the examples there (where eval mode
    does not) is refused, naming the layer whose input it mixes (or the output), never trained on silently."""
    torch.manual_seed(seed_of(f"training-only-{how}-{where}-{augmult}"))
    model = TrainingOnly(**{where: how})
    GradSampleEngine(model, max_grad_norm=1.0, augmult=augmult)
    x = torch.randn(4 * augmult, 4)
    match = (
        r"input of b \(Linear\) changes for examples that did not" if where == "between" else r"model's output changes"
    )
    with pytest.raises(ProvenanceError, match=r"in training mode.*" + match):
        model(x)
    model.eval()
    with torch.no_grad():
        model(x)  # evaluation mixes nothing


@pytest.mark.parametrize("how", ["center", "swap", "none"])
def test_the_training_check_of_a_large_batch_runs_on_its_first_examples(how):
    """20 examples: the check runs on the first 8 (TRAINING_CHECK_EXAMPLES) and still sees the mixing; a model that
    mixes nothing trains, its dropout masks those of a plain model."""
    torch.manual_seed(seed_of(f"training-check-large-{how}"))
    model = TrainingOnly(between=how)
    plain = TrainingOnly(between=how)
    plain.load_state_dict(model.state_dict())
    GradSampleEngine(model, max_grad_norm=1.0)
    x = torch.randn(20, 4)
    if how != "none":
        with pytest.raises(ProvenanceError, match=r"in training mode, the input of b \(Linear\) changes"):
            model(x)
        return
    state = torch.get_rng_state()
    out = model(x)
    out.sum().backward()
    torch.set_rng_state(state)
    torch.testing.assert_close(out, plain(x))


class CenteredOutput(nn.Module):
    """Logits centred over the batch in both modes: the mixing is after the last layer, whose input is per example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.fc(x)
        return out - out.mean(0, keepdim=True)


def test_an_output_that_mixes_examples_after_the_last_layer_is_refused():
    """Every wrapped input is per example, but each example's loss reaches the others' rows through the output."""
    torch.manual_seed(seed_of("centered-output"))
    model = CenteredOutput()
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(ProvenanceError, match=r"fastdp: the model's output changes for examples that did not change"):
        model(torch.randn(4, 4))
    model(torch.randn(1, 4)).sum().backward()  # one example: its own batch


class SequenceFirstLM(nn.Module):
    """PyTorch's word_language_model layout: an LSTM on (T, N, H), logits flattened time-major (row t * N + n), and
    the LSTM's h_n (layers * directions, N, H) and a detached batch statistic returned for logging."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 8, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(16, 20)

    def forward(self, idx):
        h, (h_n, _) = self.rnn(self.emb(idx).transpose(0, 1))
        logits = self.fc(h).view(-1, 20)  # a view: the sequence-first Linear's output is contiguous, as torch's
        return logits, h_n, logits.detach().mean(0)


@pytest.mark.parametrize("examples", [2, 3, 4])
def test_outputs_laid_out_otherwise_than_per_example_are_not_taken_for_mixing(examples):
    """Outputs whose rows do not move with the examples (time-major, h_n's batch in dim 1, a statistic) are compared
    where the probe finds their examples, else not at all: the model trains, whatever N divides."""
    torch.manual_seed(seed_of(f"sequence-first-lm-{examples}"))
    model = SequenceFirstLM()
    GradSampleEngine(model, max_grad_norm=1.0)
    logits, h_n, _ = model(torch.randint(0, 20, (examples, 6)))
    (logits.square().sum() + h_n.square().sum()).backward()


def test_a_large_batch_with_a_mask_sized_by_the_batch_is_checked_whole():
    """An attention mask of N * heads rows cannot be cut to the check's first 8 examples: the check runs on all 12."""
    torch.manual_seed(seed_of("mask-sized-by-batch"))

    class MaskedAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.fc = nn.Linear(4, 3)

        def forward(self, x, attn_mask):
            return self.fc(self.attn(x, x, x, attn_mask=attn_mask)[0].mean(1))

    model = MaskedAttention()
    GradSampleEngine(model, max_grad_norm=1.0)
    model(torch.randn(12, 5, 4), attn_mask=torch.zeros(24, 5, 5)).sum().backward()


def test_the_probe_leaves_python_randomness_rebound_buffers_and_counters_as_they_were():
    """Python's RNG is reset for every probe forward and restored after (a shift drawn from it is no mixing, and the
    step draws what a plain run draws); a buffer the training forward rebinds from the batch is refused and its
    value put back; a counter the forward keeps counts the real forwards only."""
    torch.manual_seed(seed_of("python-rng-and-buffers"))

    class PythonShift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            self.drawn = random.random()
            return self.fc(x.roll(int(self.drawn * 4), 1))

    model = PythonShift()
    GradSampleEngine(model, max_grad_norm=1.0)
    random.seed(5)
    model(torch.randn(6, 4)).sum().backward()
    random.seed(5)
    assert model.drawn == random.random()

    class Rebinds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.register_buffer("ema", torch.zeros(4))

        def forward(self, x):
            if self.training:
                self.ema = 0.9 * self.ema + 0.1 * x.mean(0)
            return self.fc(x)

    model = Rebinds()
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match=r"updated the buffer\(s\) ema from the private batch"):
        model(torch.randn(6, 4))
    assert torch.equal(model.ema, torch.zeros(4))

    class Counts(nn.Module):  # a plain number the forward keeps: the probe's forwards do not count
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.steps = 0

        def forward(self, x):
            self.steps += 1
            return self.fc(x)

    model = Counts()
    GradSampleEngine(model, max_grad_norm=1.0)
    model(torch.randn(6, 4)).sum().backward()
    assert model.steps == 1


@pytest.mark.parametrize("augmult", [1, 2])
def test_dropout_in_training_mode_is_not_taken_for_mixing(augmult):
    """Dropout draws other masks for other rows, yet each example's rows stay its own: the training-mode check runs
    both of its forwards from one RNG state and passes; the step then draws the masks a plain model draws."""
    torch.manual_seed(seed_of(f"dropout-training-{augmult}"))
    model = TrainingOnly()
    plain = TrainingOnly()
    plain.load_state_dict(model.state_dict())
    GradSampleEngine(model, max_grad_norm=1.0, augmult=augmult)
    x, t = torch.randn(4 * augmult, 4), torch.randn(4 * augmult, 3)
    state = torch.get_rng_state()
    out = model(x)  # probes (eval mode, then the training-mode check), then runs
    row_loss(out, t).mean().backward()
    torch.set_rng_state(state)
    torch.testing.assert_close(out, plain(x))


def test_layer_called_outside_the_models_forward_is_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"0 \(Linear\) was called with gradients enabled outside a forward"):
        model[0](torch.randn(3, 4))
    with torch.no_grad():
        model[0](torch.randn(3, 4))  # no gradients: nothing to clip, nothing refused


def test_one_backward_through_two_forwards_of_different_sizes_names_the_layer():
    model = nn.Sequential(nn.Linear(4, 3))
    GradSampleEngine(model, max_grad_norm=1.0)
    loss = model(torch.randn(2, 4)).sum() + model(torch.randn(6, 4)).sum()
    with pytest.raises(
        ValueError,
        match=r"two forwards of the model, micro-batches of (2 and 6|6 and 2) examples \(0 was in the second\)",
    ):
        loss.backward()


def test_one_backward_through_two_forwards_of_the_same_size_is_refused():
    """Row i of two forwards need not be one example: clipping them together gave two examples one bound (0.74 off
    the float64 loop in a review's case). Refused as for different sizes; one forward per backward still works."""
    model = nn.Sequential(nn.Linear(4, 3))
    eng = GradSampleEngine(model, max_grad_norm=1.0)
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
    loss = model(x1).sum() + model(x2).sum()
    with pytest.raises(ValueError, match=r"two forwards of the model, micro-batches of 3 and 3 examples"):
        loss.backward()
    model(x1).sum().backward()
    model(x2).sum().backward()
    summed, norms = eng.pop()
    assert norms.shape == (6,) and set(summed) == set(model.parameters())


@pytest.mark.parametrize("autotune", [False, True])
def test_probe_and_plan_leave_rng_training_flags_and_buffers_as_they_were(autotune):
    """The first forward probes the model and plans it (autotuning: timed with random output gradients, drawn from
    a generator of the engine's own); neither consumes the caller's randomness."""

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.5)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            if not self.training:
                self.calls += 1  # a buffer the probe forwards (eval mode) touch: restored afterwards
            return self.drop(self.fc(x))

    torch.manual_seed(25)
    model = Noisy()
    GradSampleEngine(model, max_grad_norm=1.0, autotune=autotune)
    plain = Noisy()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(5, 4)
    state = torch.get_rng_state()
    out = model(x)  # probes, then runs
    assert model.training and model.calls.item() == 0
    torch.set_rng_state(state)
    torch.testing.assert_close(out, plain(x))  # the same dropout mask: the probe consumed no randomness


def test_probe_cost_is_a_few_forwards_once_per_input_shape():
    """The probe runs once per input signature (not per batch size): count the wrapped forwards."""
    torch.manual_seed(26)
    model = TinyGPT()
    eng = GradSampleEngine(model, max_grad_norm=1.0)
    calls = []
    original = eng._probe

    def counting(*a):
        calls.append(1)
        return original(*a)

    eng._probe = counting
    for n in (5, 3, 7, 2, 1):
        idx, t = TinyGPT.inputs(n, 4)
        row_loss(model(idx), t).mean().backward()
    assert len(calls) == 1 and len(eng.layouts) == 1
    idx, t = TinyGPT.inputs(3, 6)  # another sequence length: another signature
    row_loss(model(idx), t).mean().backward()
    assert len(calls) == 2


def test_a_one_row_first_argument_with_the_batch_in_another_is_refused():
    """f(t, x) with t of one row: the engine reads one example and attributes every row to it, so the batch in x
    would be clipped as one example (a review measured 0.99 off the float64 loop). Refused; with the batch first, and
    for a true single example, it runs."""

    class ODEFunc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, t, x):
            return self.fc(x) * t

    model = ODEFunc()
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"first tensor argument has 1 row\(s\) in dim 0, one example, but another"):
        model(torch.tensor([0.5]), torch.randn(3, 4))
    model(torch.tensor([0.5]), torch.randn(1, 4)).sum().backward()

    class WithTable(nn.Module):  # a shared argument larger than a one-example batch, once the batch was probed
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, table):
            return self.fc(x) @ table.t()

    model = WithTable()
    GradSampleEngine(model, max_grad_norm=1.0)
    table = torch.randn(6, 4)
    model(torch.randn(3, 4), table).sum().backward()
    model(torch.randn(1, 4), table).sum().backward()


def test_activation_checkpointing_is_refused_by_name():
    """torch.utils.checkpoint recomputes a layer inside the backward, outside any forward of the model: refused with
    what happened, not with "call the model itself" (the user did)."""
    from torch.utils.checkpoint import checkpoint

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(checkpoint(self.a, x, use_reentrant=False))

    model = Model()
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"a \(Linear\) was called during a backward: activation checkpointing"):
        model(torch.randn(3, 4)).sum().backward()
