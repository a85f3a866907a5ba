"""nn.RNN, nn.LSTM, nn.GRU: exact per-example gradients through the torch.func fallback (fastdp.rules.fallback).

What the fallback cannot know and this rule says: where the batch is. With ``batch_first=False`` the examples are in
dim 1 of the input and of the output; the initial and final states (``hx``, ``h_n``, an LSTM's ``c_n``) always hold
them in dim 1. The provenance probe and the per-example recomputation read those dimensions, never the sequence.

Refused with what to do instead: a ``PackedSequence`` input (its rows are time-major over the whole batch and its
order depends on the lengths of all examples), an unbatched (2-D) input, and dropout between layers in training mode
(the recomputation would draw other masks).

Without ``hx`` the rule passes the zero state torch would create, made with ``zeros_like`` from the input: made
inside the module it would have no batch dimension under vmap, which torch's recurrent kernels do not take.

Cost: the recomputation runs the recurrence once more per example under vmap; it is exact but slow next to the
fast rules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from fastdp.engine.binding import Binding, CallError, bind_call
from fastdp.rules.base import LayerCall, register_rule
from fastdp.rules.fallback import FallbackRule


@register_rule(nn.RNN, nn.LSTM, nn.GRU)
class RecurrentRule(FallbackRule):
    def bind(self, module: nn.RNNBase, args: tuple, kwargs: dict) -> Binding:
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, PackedSequence):
            raise CallError(
                "a PackedSequence input interleaves the examples time-major, in an order set by all of their "
                "lengths, so its rows cannot be attributed to examples. Pass the padded batch (and mask the padded "
                "steps in the loss) instead."
            )
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise CallError(f"it takes a batched 3-D input here, got {shape}. Pass a batch of sequences.")
        if module.training and module.dropout > 0 and module.num_layers > 1:
            raise CallError(
                f"dropout={module.dropout} between its layers draws random masks that the per-example recomputation "
                "would not reproduce. Build it with dropout=0 (apply nn.Dropout outside the recurrent module)."
            )
        return bind_call(module, args, kwargs, dims={"input": 0 if module.batch_first else 1, "hx": 1})

    def arguments(self, call: LayerCall, inputs: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        args, kwargs = super().arguments(call, inputs)
        if (args[1] if len(args) > 1 else kwargs.get("hx")) is not None:
            return args, kwargs
        module: nn.RNNBase = call.module
        x = args[0] if args else kwargs["input"]
        # (batch, 1) zeros that vmap sees batched whenever the input is, then torch's default state's shape
        column = torch.zeros_like(x.select(1 if module.batch_first else 0, 0)[..., :1])
        layers = module.num_layers * (2 if module.bidirectional else 1)
        size = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
        hx = column.unsqueeze(0).expand(layers, -1, size).contiguous()
        if isinstance(module, nn.LSTM):
            hx = (hx, column.unsqueeze(0).expand(layers, -1, module.hidden_size).contiguous())
        return args, {**kwargs, "hx": hx}

    def out_dims(self, module: nn.RNNBase, outputs: Sequence[torch.Tensor]) -> list[int]:
        # (output, h_n) or (output, (h_n, c_n)): the states hold the batch in dim 1 whatever batch_first says
        return [0 if module.batch_first else 1] + [1] * (len(outputs) - 1)
