"""Drop-in ``torch.nn.LSTMCell``, ``GRUCell``, ``LSTM`` and ``GRU`` that run on fastattn's ops.

The cells subclass their ``torch.nn`` namesakes and ``LSTM``/``GRU`` subclass
``torch.nn.RNNBase`` (what ``torch.nn.LSTM``/``GRU`` are made of) and override
``forward`` only, so constructor arguments, parameter names, ``state_dict`` keys and
every other method are torch's own, and ``load_state_dict`` works both ways.  They
are not subclasses of ``torch.nn.LSTM``/``GRU`` themselves because torch.compile
refuses to trace those (``torch._dynamo.config.allow_rnn``); ours compile.  The cells run the
``lstm_cell``/``gru_cell`` ops; ``LSTM`` and ``GRU`` run ``lstm_layer``/``gru_layer``
once per layer and direction.

``module.backend`` picks the implementation: ``None`` (the default) follows the
setting in force (``fastattn.set_backend``, ``with fastattn.backend(...)``,
``FASTATTN_BACKEND``), a backend name forces that backend for this module.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from fastattn import checks
from fastattn.functional.recurrent import (
    check_initial_state,
    check_sequence_input,
    check_state_pair,
    run_gru_cell,
    run_layers,
    run_lstm_cell,
)


class LSTMCell(torch.nn.LSTMCell):
    backend: str | None = None

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        return run_lstm_cell(
            input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
            backend=self.backend, input_name="input",
        )


class GRUCell(torch.nn.GRUCell):
    backend: str | None = None

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return run_gru_cell(
            input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
            backend=self.backend, input_name="input",
        )


class _StackedRecurrence:
    """The ``forward`` shared by :class:`LSTM` and :class:`GRU`.

    It brings every input form torch accepts (batch-first, unbatched, packed) to a
    time-major (T, B, I) batch, runs :func:`run_layers` and restores the form.
    Subclasses set ``layer_op`` (the op run per layer and direction) and
    ``layer_weight_names`` (its weight arguments, in order, as parameter name
    prefixes), and say what their states look like: ``state_shapes()`` gives the
    (argument name, size, size name) of each state, ``split_states(hx)`` takes
    the caller's ``hx`` apart and ``join_states(states)`` puts the final ones together.
    """

    backend: str | None = None

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        check_sequence_input(
            "input", input, input_size=self.input_size, weight_name="weight_ih_l0",
            weight=self.weight_ih_l0, batch_first=self.batch_first, packed=False,
        )
        batched = input.dim() == 3
        if not batched:
            x = input.unsqueeze(1)
        elif self.batch_first:
            x = input.transpose(0, 1)
        else:
            x = input
        states = self._initial_states(hx, x, batched, input)
        output, finals = self._run(x, states, lengths=None)
        if not batched:
            output, finals = output.squeeze(1), [state.squeeze(1) for state in finals]
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, self.join_states(finals)

    def _forward_packed(self, input: PackedSequence, hx):
        """Runs in the packed (sorted) batch order; ``hx`` and the final states are in
        the caller's order, as in torch.  The output keeps the input's batch_sizes and indices."""
        data = check_sequence_input(
            "input", input.data, input_size=self.input_size, weight_name="weight_ih_l0",
            weight=self.weight_ih_l0, batch_first=self.batch_first, packed=True,
        )
        _check_packed_layout(input, data.shape[0])
        # The batch read once: under torch.compile each read of batch_sizes is a new
        # unbacked size, which the layer op's check of lengths (B,) could not match; and
        # torch.compile is told it is the indices' length (checked above, when eager).
        steps, batch = len(input.batch_sizes), int(input.batch_sizes[0])
        if input.sorted_indices is not None:
            torch._check(batch == input.sorted_indices.shape[0])
        rows, lengths = _packed_rows(input.batch_sizes, batch, data.device)
        x = data.new_zeros(steps * batch, data.shape[-1]).index_copy(0, rows, data).view(steps, batch, -1)
        states = _reorder_batch(self._initial_states(hx, x, True, data), input.sorted_indices)
        output, finals = self._run(x, states, lengths=lengths)
        packed_output = PackedSequence(
            output.flatten(0, 1).index_select(0, rows), input.batch_sizes, input.sorted_indices, input.unsorted_indices
        )
        return packed_output, self.join_states(_reorder_batch(finals, input.unsorted_indices))

    def _initial_states(self, hx, x: Tensor, batched: bool, input: Tensor) -> list[Tensor]:
        """Zeros when ``hx`` is None, else the checked states with a batch dimension."""
        layers = self.num_layers * (2 if self.bidirectional else 1)
        batch = x.shape[1]
        if hx is None:
            return [x.new_zeros(layers, batch, size) for _, size, _ in self.state_shapes()]
        states = []
        for (name, size, size_name), state in zip(self.state_shapes(), self.split_states(hx)):
            if batched:
                expected = (layers, batch, size)
                meaning = lambda: f"(num_layers * num_directions, batch, {size_name}) = {expected}"
            else:
                expected = (layers, size)
                meaning = lambda: f"(num_layers * num_directions, {size_name}) = {expected} for unbatched input"
            check_initial_state(name, state, expected, meaning, "input", input)
            states.append(state if batched else state.unsqueeze(1))
        return states

    def _run(self, x: Tensor, states: list[Tensor], lengths: Tensor | None):
        suffixes = ("", "_reverse") if self.bidirectional else ("",)
        weights = [
            [
                tuple(getattr(self, f"{name}_l{layer}{suffix}", None) for name in self.layer_weight_names)
                for suffix in suffixes
            ]
            for layer in range(self.num_layers)
        ]
        return run_layers(
            self.layer_op, x, states, weights, lengths=lengths,
            dropout=self.dropout, training=self.training, backend=self.backend,
        )


class LSTM(_StackedRecurrence, torch.nn.RNNBase):
    layer_op = "lstm_layer"
    layer_weight_names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")

    # torch.nn.LSTM's helpers for its (h, c) state; RNNBase's take one tensor.
    get_expected_cell_size = torch.nn.LSTM.get_expected_cell_size
    check_forward_args = torch.nn.LSTM.check_forward_args
    permute_hidden = torch.nn.LSTM.permute_hidden

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    def state_shapes(self) -> list[tuple[str, int, str]]:
        projected = self.proj_size > 0
        h_size, h_size_name = (self.proj_size, "proj_size") if projected else (self.hidden_size, "hidden_size")
        return [("hx[0]", h_size, h_size_name), ("hx[1]", self.hidden_size, "hidden_size")]

    def split_states(self, hx: object) -> tuple[object, object]:
        return check_state_pair("hx", hx)

    def join_states(self, states: list[Tensor]) -> tuple[Tensor, Tensor]:
        return states[0], states[1]


class GRU(_StackedRecurrence, torch.nn.RNNBase):
    layer_op = "gru_layer"
    layer_weight_names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    def state_shapes(self) -> list[tuple[str, int, str]]:
        return [("hx", self.hidden_size, "hidden_size")]

    def split_states(self, hx: object) -> tuple[object]:
        return (hx,)

    def join_states(self, states: list[Tensor]) -> Tensor:
        return states[0]


def _check_packed_layout(input: PackedSequence, rows: int) -> None:
    """A PackedSequence built by hand must still be one ``pack_padded_sequence`` could
    make: ``batch_sizes`` a non-empty 1-D integer CPU tensor of positive, non-increasing
    sizes adding up to the rows of ``data``, and each of ``sorted_indices`` and
    ``unsorted_indices`` None or a permutation of the batch, the inverse of the other."""
    batch_sizes = checks.integer_tensor("input.batch_sizes", input.batch_sizes)
    if batch_sizes.dim() != 1 or batch_sizes.numel() == 0 or batch_sizes.device.type != "cpu":
        raise ValueError(f"input.batch_sizes must be a non-empty 1-D CPU tensor, got {checks.describe(batch_sizes)}")
    if not checks.reads_values():
        return
    sizes = batch_sizes.tolist()
    if sizes[-1] < 1 or any(later > earlier for earlier, later in zip(sizes, sizes[1:])) or sum(sizes) != rows:
        shown = sizes if len(sizes) <= 12 else f"{sizes[:12]}..."
        raise ValueError(
            f"input.batch_sizes must be positive, non-increasing and add up to the {rows} rows of input.data, "
            f"got {shown} (sum {sum(sizes)})"
        )
    batch = sizes[0]
    for name in ("sorted_indices", "unsorted_indices"):
        indices = getattr(input, name)
        if indices is None:
            continue
        indices = checks.integer_tensor(f"input.{name}", indices)
        if indices.shape != (batch,) or not torch.equal(indices.sort().values.cpu(), torch.arange(batch)):
            raise ValueError(
                f"input.{name} must be a permutation of the batch's {batch} sequences, got {checks.describe(indices)}"
            )
    if input.sorted_indices is not None and input.unsorted_indices is not None:
        if not torch.equal(input.sorted_indices[input.unsorted_indices].cpu(), torch.arange(batch)):
            raise ValueError("input.unsorted_indices must be the inverse permutation of input.sorted_indices")


def _packed_rows(batch_sizes: Tensor, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Where a packed sequence's rows go in its zero-padded (T, B) batch (packed, sorted
    order; ``batch`` is batch_sizes[0]), flattened to T * B, and each sequence's length,
    both on ``device``.  Computed from ``batch_sizes``, which a PackedSequence keeps on the
    CPU: no boolean indexing of device tensors (a host sync on CUDA, and no meta kernel)."""
    valid = torch.arange(batch) < batch_sizes.unsqueeze(1)  # row-major order is the packed order
    return valid.flatten().nonzero().squeeze(1).to(device), valid.sum(0).to(device)


def _reorder_batch(states: list[Tensor], indices: Tensor | None) -> list[Tensor]:
    if indices is None:
        return states
    return [state.index_select(1, indices) for state in states]
