"""Curvature blocks for recurrent layers: `nn.RNN` (tanh, relu), `nn.LSTM` and `nn.GRU`.

A recurrent layer applies the same weights at every time step t of layer l and direction d:

    gates_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh            (RNN, LSTM; LSTM with 4 gate blocks)
    r, z = sigmoid(rows of gates_t), n = tanh(i_n + r * (W_hn h_{t-1} + b_hn))   (GRU)
    h_t = W_hr (o_t * tanh(c_t))                                (LSTM with proj_size > 0)

Each matrix is a Linear layer whose weight is shared over the T time steps, so it gets the
`expand` Kronecker factors of Eschenhagen et al. (2023): A = 1/(N T) sum_{n,t} a~ a~^T over its
inputs a~ = [a, 1] (x_t for W_ih, h_{t-1} for W_hh, o_t * tanh(c_t) for W_hr; the 1 with a bias)
and G = 1/N sum_{n,t} g g^T over the per-example gradients g with respect to its outputs. For
RNN and LSTM, W_ih x_t + b_ih and W_hh h_{t-1} + b_hh add up to the gate pre-activations, so both
matrices share one G; for GRU the n-rows of W_hh's output are multiplied by the reset gate r, so
its g is [g_r, g_z, r * g_n] while W_ih's is [g_r, g_z, g_n].

The fused kernels (`_VF.lstm`, ...) do not expose the gate pre-activations. On steps that record
statistics the block therefore runs its own re-implementation of the recurrence (the same math as
PyTorch's CPU kernels, in the same order) and puts tensor hooks on the input projections
W_ih x_t + b_ih of all time steps (one tensor per layer and direction) and, with a projection,
on a zero probe added to the projected hidden states; every other step runs the module's own
fused forward. Packed sequences are supported: finished sequences keep their hidden state
(as PyTorch's kernels do), and their padded positions count neither in A nor in G (A is then
averaged over the sum of the sequence lengths instead of N T). With kfac_approx='reduce' the
inputs are averaged and the output gradients summed over each example's steps first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from torch_kfac.blocks.approximation import damped_kronecker_inverses, kronecker_power
from torch_kfac.blocks.base import centered, input_second_moment, second_moment_scale
from torch_kfac.blocks.switched import SwitchedForwardBlock
from torch_kfac.linalg import symmetric_eigh

#: Gate blocks stacked in the rows of W_ih and W_hh, per recurrent mode.
GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}
_BASE_CLASSES = (nn.RNN, nn.LSTM, nn.GRU)


@dataclass(frozen=True)
class RecurrentMatrix:
    """One weight matrix of a recurrent layer and the names of its factors."""

    #: Parameter suffix, e.g. 'ih_l0' or 'hh_l1_reverse'.
    name: str
    weight: str
    bias: str | None
    a_key: str
    g_key: str


class RNNBlock(SwitchedForwardBlock):
    """K-FAC block of `nn.RNN`, `nn.LSTM` or `nn.GRU`: one Kronecker pair per weight matrix.

    Handles every layer, both directions, `batch_first`, `bias=False`, LSTM projections
    (`proj_size`), packed sequences, unbatched inputs and user-given initial states. Between
    layers the recurrence applies the module's dropout (`F.dropout` in training mode). The gradient
    layout (`pack`) is the flat concatenation of all parameters in `_flat_weights` order.
    """

    def __init__(self, module: nn.Module, name: str = "") -> None:
        self._check_module(module, name)
        assert isinstance(module, nn.RNNBase)
        self.mode: str = module.mode
        self.num_directions = 2 if module.bidirectional else 1
        self.matrices = self._describe_matrices(module)
        factors: list[str] = []
        for mat in self.matrices:
            factors += [k for k in (mat.a_key, mat.g_key) if k not in factors]
        self.FACTORS = tuple(factors)  # type: ignore[misc]
        self.FORWARD_FACTORS = tuple(m.a_key for m in self.matrices)  # type: ignore[misc]
        super().__init__(module, name)
        self.param_names: list[str] = list(module._flat_weights_names)
        self.power = -1.0
        self.kfac_approx = "expand"
        self.attach()

    @staticmethod
    def _check_module(module: nn.Module, name: str) -> None:
        """Refuse modules whose forward the re-implemented recurrence would not reproduce (or frozen)."""
        if not isinstance(module, _BASE_CLASSES) or module.mode not in GATES:
            raise TypeError(f"RNNBlock handles nn.RNN, nn.LSTM and nn.GRU, got {type(module).__name__}")
        base = next(cls for cls in _BASE_CLASSES if isinstance(module, cls))
        skip = f"pass skip_modules=[{name!r}] to leave it to the plain update"
        if type(module).forward is not base.forward:
            raise ValueError(
                f"{type(module).__name__} {name!r} overrides forward(); K-FAC re-implements "
                f"{base.__name__}'s recurrence to see its gates and cannot reproduce yours: {skip}"
            )
        SwitchedForwardBlock.check_forward_attribute(module, name, "recurrence")
        params = [getattr(module, n) for n in module._flat_weights_names]
        for weight_name, param in zip(module._flat_weights_names, params, strict=True):
            if not isinstance(param, nn.Parameter):
                raise ValueError(
                    f"{type(module).__name__} {name!r}: {weight_name} is not a plain parameter "
                    f"(a parametrization?), so K-FAC cannot precondition its gradient: {skip}"
                )
        # Refused here, before the forward is switched, rather than built and then dropped.
        if not all(p.requires_grad for p in params):
            raise ValueError("parameters frozen (requires_grad=False)")

    def _describe_matrices(self, module: nn.RNNBase) -> list[RecurrentMatrix]:
        """The weight matrices of every layer and direction, with their factor names."""
        matrices = []
        for layer in range(module.num_layers):
            for direction in range(self.num_directions):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                shared_g = f"G{sfx}"
                for kind in ("ih", "hh"):
                    g_key = f"G_{kind}{sfx}" if self.mode == "GRU" else shared_g
                    bias = f"bias_{kind}{sfx}" if module.bias else None
                    matrices.append(
                        RecurrentMatrix(f"{kind}{sfx}", f"weight_{kind}{sfx}", bias, f"A_{kind}{sfx}", g_key)
                    )
                if module.proj_size > 0:
                    matrices.append(
                        RecurrentMatrix(f"hr{sfx}", f"weight_hr{sfx}", None, f"A_hr{sfx}", f"G_hr{sfx}")
                    )
        return matrices

    def configure(
        self, approximation: str = "kfac", power: float = -1.0, kfac_approx: str = "expand"
    ) -> None:
        """Matrix power (-1 or -1/2) and weight-sharing rule over time steps ('expand' or 'reduce').

        'reduce' (Eschenhagen et al. 2023) averages each example's inputs over its steps and sums
        its output gradients over them before the second moments. Only approximation='kfac'.
        """
        if approximation != "kfac":
            self.remove()  # refused while the optimizer is being built: leave the module as it was
            raise ValueError(
                f"{type(self.module).__name__} {self.name!r}: approximation={approximation!r} is not "
                f"supported by its K-FAC block (only 'kfac'); pass skip_modules=[{self.name!r}] to use "
                "the plain update"
            )
        if power not in (-1.0, -0.5):
            raise ValueError(f"power must be -1 or -0.5, got {power!r}")
        if kfac_approx not in ("expand", "reduce"):
            raise ValueError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}")
        self.power, self.kfac_approx = float(power), kfac_approx

    # ----------------------------------------------------------------------- parameters
    @property
    def weight(self) -> Tensor:
        """The first input-to-hidden weight (device and dtype of the block's state)."""
        return getattr(self.module, self.param_names[0])

    @property
    def bias(self) -> Tensor | None:
        """No single bias: the biases are among `parameters()`."""
        return None

    def parameters(self) -> list[Tensor]:
        """Every weight and bias of the module, in `_flat_weights` order."""
        return [getattr(self.module, n) for n in self.param_names]

    def pack(self, tensors: list[Tensor]) -> Tensor:
        """Parameter-shaped tensors (in `parameters()` order) concatenated into one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unpack(self, mat: Tensor) -> list[Tensor]:
        """Inverse of `pack`: one parameter-shaped tensor per parameter."""
        params = self.parameters()
        pieces = mat.split([p.numel() for p in params])
        return [piece.reshape(p.shape) for piece, p in zip(pieces, params, strict=True)]

    def _matrix_views(self, flat: Tensor) -> dict[str, Tensor]:
        """Each matrix's [W, b] (bias as the last column) from a flat `pack` layout."""
        parts = dict(zip(self.param_names, self.unpack(flat), strict=True))
        views = {}
        for mat in self.matrices:
            w = parts[mat.weight]
            views[mat.name] = w if mat.bias is None else torch.cat([w, parts[mat.bias].unsqueeze(-1)], -1)
        return views

    def _flatten_matrices(self, views: dict[str, Tensor]) -> Tensor:
        """Inverse of `_matrix_views`."""
        parts: dict[str, Tensor] = {}
        for mat in self.matrices:
            m = views[mat.name]
            if mat.bias is None:
                parts[mat.weight] = m
            else:
                parts[mat.weight], parts[mat.bias] = m[:, :-1], m[:, -1]
        return self.pack([parts[n] for n in self.param_names])

    # ------------------------------------------------------------------ forward switch
    def num_examples(self, inputs: tuple[Tensor, ...]) -> int:
        """N: the batch dimension of a batched input (dim 0 with batch_first), 1 if unbatched."""
        x = inputs[0]
        if x.dim() == 2:
            return 1
        return int(x.shape[0 if self.module.batch_first else 1])

    def observe_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """N of the call's input (a packed sequence's first batch size)."""
        first = args[0] if args else kwargs.get("input")
        if isinstance(first, PackedSequence):
            self.batch_size = int(first.batch_sizes[0])
        elif isinstance(first, Tensor) and first.dim() in (2, 3):
            self.batch_size = self.num_examples((first,))

    def recording_forward(self, *args: Any, keep: list[Tensor] | None = None, **kwargs: Any) -> Any:
        """The recurrence that records the factors' statistics."""
        return self.recurrence(*args, keep=keep, **kwargs)

    # -------------------------------------------------------------------- recurrence
    def recurrence(
        self, input: Tensor | PackedSequence, hx: Any = None, *, keep: list[Tensor] | None = None
    ) -> tuple[Any, Any]:
        """The module's forward, re-implemented step by step, recording the factors' statistics.

        Takes and returns what the module's forward does. A is recorded now and, when gradients
        are enabled, G by tensor hooks in the backward pass; `keep` receives the tensors whose
        gradients those hooks read.
        """
        m = self.module
        assert isinstance(m, nn.RNNBase)
        lstm = self.mode == "LSTM"
        out_size = m.proj_size if m.proj_size > 0 else m.hidden_size
        active: Tensor | None = None
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            steps, n = len(batch_sizes), int(batch_sizes[0])
            # active[t, b]: sequence b (in sorted order) has a step t; packed data lists these
            # (t, b) row-major, so boolean indexing with `active` packs and unpacks.
            active = torch.arange(n)[None, :] < batch_sizes[:, None]
            active = active.to(data.device)
            x = data.new_zeros(steps, n, data.shape[-1]).index_put((active,), data)
            checked, is_batched, batch_dim = data, True, 1
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"{type(m).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead"
                )
            batch_sizes = sorted_indices = unsorted_indices = None
            is_batched = input.dim() == 3
            batch_dim = 0 if m.batch_first else 1
            checked = input if is_batched else input.unsqueeze(batch_dim)
            x = checked.transpose(0, 1) if m.batch_first else checked
            steps, n = int(x.shape[0]), int(x.shape[1])
        if hx is None:
            h0 = x.new_zeros(m.num_layers * self.num_directions, n, out_size)
            hidden: Any = (
                (h0, x.new_zeros(m.num_layers * self.num_directions, n, m.hidden_size)) if lstm else h0
            )
        else:
            hidden = hx
            if not is_batched:
                dims = [t.dim() for t in hidden] if lstm else [hidden.dim()]
                if any(d != 2 for d in dims):
                    raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got {dims}-D")
                hidden = tuple(t.unsqueeze(1) for t in hidden) if lstm else hidden.unsqueeze(1)
            m.check_forward_args(checked, hidden, batch_sizes)  # type: ignore[arg-type]
            hidden = m.permute_hidden(hidden, sorted_indices)  # type: ignore[arg-type]
        h_init, c_init = hidden if lstm else (hidden, None)

        self.batch_size = n
        params = {p: getattr(m, p) for p in self.param_names}
        layer_input, h_last, c_last = x, [], []
        for layer in range(m.num_layers):
            if layer > 0 and m.training and m.dropout > 0:
                layer_input = F.dropout(layer_input, m.dropout, training=True)
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                out, h_n, c_n = self._direction(
                    layer_input,
                    h_init[index],
                    None if c_init is None else c_init[index],
                    layer,
                    direction,
                    params,
                    active,
                    keep,
                )
                outputs.append(out)
                h_last.append(h_n)
                c_last.append(c_n)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, -1)
        h_out = torch.stack(h_last)
        state: Any = (h_out, torch.stack(c_last)) if lstm else h_out
        if active is not None:
            packed = PackedSequence(layer_input[active], batch_sizes, sorted_indices, unsorted_indices)
            return packed, m.permute_hidden(state, unsorted_indices)  # type: ignore[arg-type]
        output = layer_input.transpose(0, 1) if m.batch_first else layer_input
        if not is_batched:
            output = output.squeeze(batch_dim)
            state = tuple(s.squeeze(1) for s in state) if lstm else state.squeeze(1)
        return output, state

    def _direction(
        self,
        inputs: Tensor,
        h: Tensor,
        c: Tensor | None,
        layer: int,
        direction: int,
        params: dict[str, Tensor],
        active: Tensor | None,
        keep: list[Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One layer in one direction over all steps: outputs (T, N, H_out), last h and c."""
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        bias = self.module.bias
        w_ih, w_hh = params[f"weight_ih{sfx}"], params[f"weight_hh{sfx}"]
        b_ih = params[f"bias_ih{sfx}"] if bias else None
        b_hh = params[f"bias_hh{sfx}"] if bias else None
        w_hr = params.get(f"weight_hr{sfx}")
        steps = inputs.shape[0]
        # Input projections of all steps at once, as PyTorch's CPU kernels precompute them; their
        # gradient is that of the gate pre-activations (or, GRU, of W_ih's share of them).
        projected = F.linear(inputs, w_ih, b_ih)
        watch = projected.requires_grad
        probe = None
        if watch and w_hr is not None:
            # Zero added to each projected hidden state; its gradient is dL/dh_t for all steps.
            probe = inputs.new_zeros(steps, inputs.shape[1], w_hr.shape[0], requires_grad=True)
        probes = probe.unbind(0) if probe is not None else None
        gi = projected.unbind(0)
        outputs: list[Tensor] = [h] * steps
        previous: list[Tensor] = [h] * steps  # h_{t-1} as fed to W_hh at step t
        cells: list[Tensor] = [h] * steps  # o_t * tanh(c_t) as fed to W_hr
        resets: list[Tensor] = [h] * steps  # GRU reset gates r_t
        order = range(steps - 1, -1, -1) if direction else range(steps)
        for t in order:
            previous[t] = h
            gates_h = F.linear(h, w_hh, b_hh)
            if self.mode == "LSTM":
                assert c is not None
                i, f, g, o = (gates_h + gi[t]).chunk(4, -1)
                c_new = f.sigmoid() * c + i.sigmoid() * g.tanh()
                m_t = o.sigmoid() * c_new.tanh()
                h_new = m_t
                if w_hr is not None:
                    cells[t] = m_t
                    h_new = F.linear(m_t, w_hr)
                    if probes is not None:
                        h_new = h_new + probes[t]
                if active is not None:
                    c_new = torch.where(active[t].unsqueeze(-1), c_new, c)
                c = c_new
            elif self.mode == "GRU":
                i_r, i_z, i_n = gi[t].chunk(3, -1)
                h_r, h_z, h_n = gates_h.chunk(3, -1)
                r = (h_r + i_r).sigmoid()
                z = (h_z + i_z).sigmoid()
                n = (i_n + h_n * r).tanh()
                h_new = (h - n) * z + n
                resets[t] = r.detach()
            else:
                pre = gates_h + gi[t]
                h_new = pre.tanh() if self.mode == "RNN_TANH" else pre.relu()
            if active is not None:
                # A finished sequence keeps its state (and a reverse one starts at its own end).
                h_new = torch.where(active[t].unsqueeze(-1), h_new, h)
            h = h_new
            outputs[t] = h
        self._record_forward(sfx, inputs, previous, cells if w_hr is not None else None, active)
        if watch:
            if self.mode == "GRU":
                hook = self._gate_hook(f"G_ih{sfx}", active, (f"G_hh{sfx}", torch.stack(resets)))
            else:
                hook = self._gate_hook(f"G{sfx}", active)
            projected.register_hook(hook)
            if keep is not None:
                keep.append(projected)
            if probe is not None:
                probe.register_hook(self._gate_hook(f"G_hr{sfx}", active))
                if keep is not None:
                    keep.append(probe)
        return torch.stack(outputs), h, c

    # -------------------------------------------------------------------- statistics
    def _record_forward(
        self,
        sfx: str,
        inputs: Tensor,
        previous: list[Tensor],
        cells: list[Tensor] | None,
        active: Tensor | None,
    ) -> None:
        """Pend each matrix's A: 1/K sum a~ a~^T over the K active (example, step) rows ('expand')
        or 1/N sum over examples of the mean over their steps ('reduce')."""
        bias = bool(self.module.bias)
        sources = [("ih", inputs, bias), ("hh", torch.stack(previous), bias)]
        if cells is not None:
            sources.append(("hr", torch.stack(cells), False))
        for kind, steps, with_bias in sources:
            rows = self._rows(steps.detach(), active)
            if self.kfac_approx == "reduce":
                # The mean of a~ = [a, 1] over an example's steps is [mean a, 1].
                count = steps.shape[0] if active is None else active.sum(0).unsqueeze(-1)
                rows = rows / count
            self.add_forward_statistic(f"A_{kind}{sfx}", self._input_moment(rows, with_bias), steps.shape[1])

    def _rows(self, steps: Tensor, active: Tensor | None) -> Tensor:
        """(T, N, k) per-step values as statistic rows: the active (example, step) pairs
        ('expand', (K, k)) or each example's sum over its active steps ('reduce', (N, k))."""
        if self.kfac_approx == "reduce":
            if active is None:
                return steps.sum(0)
            return (steps * active.unsqueeze(-1).to(steps.dtype)).sum(0)
        return steps[active] if active is not None else steps.reshape(-1, steps.shape[-1])

    def _input_moment(self, rows: Tensor, bias: bool) -> Tensor:
        """1/K sum over K rows of a~ a~^T, a~ = [a, 1] with a bias (centered rows if `center`)."""
        return input_second_moment(centered(rows) if self.center else rows, bias)

    def _gate_hook(
        self, key: str, active: Tensor | None, gru_hh: tuple[str, Tensor] | None = None
    ) -> Callable[[Tensor], None]:
        """Hook on a (T, N, k) tensor: pend s * sum_{n,t} g g^T, s from the loss's reduction
        ('reduce': s * sum_n (sum_t g)(sum_t g)^T).

        For a GRU (`gru_hh` = (W_hh's G key, reset gates r of all steps)) it also pends W_hh's
        statistic: dL/d(W_hh h + b_hh) is dL/d(gate pre-activations) with the n-rows times r.
        """

        def hook(grad: Tensor) -> None:
            if self.backward_gate is not None and not self.backward_gate():
                return
            g = self.statistics_grad(grad.detach())
            n = int(g.shape[1])
            scale = second_moment_scale(self.reduction, n, self.loss_terms)
            self.add_backward_statistic(key, self._output_moment(self._rows(g, active)) * scale, n)
            if gru_hh is not None:
                hh_key, reset = gru_hh
                size = reset.shape[-1]
                hh = torch.cat([g[..., : 2 * size], g[..., 2 * size :] * reset], -1)
                self.add_backward_statistic(hh_key, self._output_moment(self._rows(hh, active)) * scale, n)

        return hook

    def _output_moment(self, rows: Tensor) -> Tensor:
        """sum over rows of g g^T (centered rows if `center`)."""
        if self.center:
            rows = centered(rows)
        return rows.mT @ rows

    # ----------------------------------------------------------------------- factors
    def factors(self, matrix: str) -> tuple[Tensor, Tensor]:
        """(A, G) of one weight matrix, e.g. 'ih_l0', 'hh_l1_reverse' or 'hr_l0'."""
        mat = self._matrix(matrix)
        return self._factor(mat.a_key), self._factor(mat.g_key)

    def _matrix(self, name: str) -> RecurrentMatrix:
        for mat in self.matrices:
            if mat.name == name:
                return mat
        raise KeyError(f"{type(self).__name__} {self.name!r} has no matrix {name!r}")

    # ---------------------------------------------------------------- preconditioning
    def _inverse_keys(self) -> list[str]:
        keys = [f"{m.name}_{s}_inv" for m in self.matrices for s in ("A", "G")]
        return keys + [f"{k}_{s}" for k in self.FACTORS for s in ("eigvals", "eigvecs")]

    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """Refresh per-matrix damped inverses ('cholesky') or per-factor eigendecompositions ('eigh').

        With 'cholesky' the damping is baked into the inverses; with 'eigh' (and for any power
        other than -1) it is applied at preconditioning time.
        """
        self.drop_state(self._inverse_keys())
        if method == "cholesky" and self.power == -1.0:
            for mat in self.matrices:
                inverses = damped_kronecker_inverses(*self.factors(mat.name), damping, pi_correction)
                self.state[f"{mat.name}_A_inv"], self.state[f"{mat.name}_G_inv"] = inverses
            return
        for key in self.FACTORS:
            self.state[f"{key}_eigvals"], self.state[f"{key}_eigvecs"] = symmetric_eigh(self._factor(key))

    def has_inverses(self) -> bool:
        """Whether every matrix has a cached inverse or eigendecomposition."""
        first = self.matrices[0]
        return f"{first.name}_A_inv" in self.state or f"{first.a_key}_eigvecs" in self.state

    def precondition(
        self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str = "factored"
    ) -> Tensor:
        """Damped inverse Kronecker curvature (to `power`) applied to every matrix of a flat layout."""
        views = self._matrix_views(mat)
        result = {}
        for m in self.matrices:
            grad = views[m.name]
            if f"{m.name}_A_inv" in self.state:  # Cholesky inverses, power -1
                result[m.name] = self.state[f"{m.name}_G_inv"] @ grad @ self.state[f"{m.name}_A_inv"]
                continue
            eigen = tuple(self.state[f"{k}_{c}"] for k in (m.a_key, m.g_key) for c in ("eigvals", "eigvecs"))
            result[m.name] = kronecker_power(
                grad, self.factors(m.name), eigen, damping, pi_correction, damping_type, self.power
            )
        return self._flatten_matrices(result)

    def curvature_product(self, mat: Tensor) -> Tensor:
        """(A (x) G) vec(M) = G M A for every matrix, undamped."""
        views = self._matrix_views(mat)
        result = {}
        for m in self.matrices:
            a, g = self.factors(m.name)
            result[m.name] = g @ views[m.name] @ a
        return self._flatten_matrices(result)

    def extra_repr(self) -> str:
        """Factor shapes per kind of matrix and the memory of one factor set."""
        params = dict(zip(self.param_names, self.parameters(), strict=True))
        shapes: dict[str, tuple[set[int], set[int]]] = {}
        dims = {}
        for m in self.matrices:
            d_out, d_in = params[m.weight].shape
            d_in += m.bias is not None
            dims[m.a_key], dims[m.g_key] = d_in, d_out
            a_dims, g_dims = shapes.setdefault(m.name.split("_")[0], (set(), set()))
            a_dims.add(d_in)
            g_dims.add(d_out)

        def square(sizes: set[int]) -> str:
            return "/".join(f"{d}x{d}" for d in sorted(sizes))

        kinds = ", ".join(f"{kind} A {square(a)} G {square(g)}" for kind, (a, g) in shapes.items())
        shared = " (ih and hh share G)" if self.mode != "GRU" else ""
        size = sum(d * d for d in dims.values()) * self.weight.element_size()
        count = f"{len(self.matrices)} matrices: {self.module.num_layers} layer(s) x {self.num_directions}"
        return f"{count} direction(s); {kinds}{shared}; {size / 2**20:.2f} MiB per factor set"
