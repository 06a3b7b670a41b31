"""Curvature block for `nn.MultiheadAttention`: Kronecker factors for its in- and out-projections.

The module holds four linear maps: the in-projections of query, key and value (packed row-wise as
q, k, v in `in_proj_weight` (3E, E), or separate `q_proj_weight` (E, E), `k_proj_weight` (E, kdim)
and `v_proj_weight` (E, vdim) when kdim or vdim differ from E; one packed `in_proj_bias` (3E)) and
the out-projection `out_proj` (E, E) with its bias. Each is a Linear layer shared over sequence
positions and gets the `expand` factors of one (Eschenhagen et al. 2023):

    A = 1/(N T) sum_{n,t} a~ a~^T  (a~ = [a, 1] with a bias),    G = s sum_{n,t} g g^T,

with s = `second_moment_scale(reduction, N, loss_terms)` and T the positions of the projection's
input (the target length for the query and the out-projection, the source length for key and value).

Factor pairs:

* self-attention (query is key is value) with the packed weight: the in-projection is one Linear
  on the shared input, so one pair (A_in, G_in) with G_in over all 3E outputs;
* otherwise (cross-attention, or separate weights) one pair per q, k, v row block of the
  in-projection, whose inputs differ: (A_q, G_q), (A_k, G_k), (A_v, G_v);
* always (A_out, G_out) for the out-projection.

`F.multi_head_attention_forward` hides the projections' inputs and outputs, so on recording steps
the module runs through `attention_forward`: its slow path rewritten with the projections as explicit
`F.linear` calls (the same operations in the same order, hence the same outputs and the same dropout
draws), where the block takes its statistics itself: inputs in the forward pass, output gradients
through tensor hooks. Other steps run the module's own forward, fast path included.

`bias_k` and `bias_v` (add_bias_kv=True) are appended to the keys and values after the projections;
the block has no factors for them and reports them in `unhandled_parameters` (the plain update).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_kfac.blocks.approximation import damped_kronecker_inverses, kronecker_power
from torch_kfac.blocks.base import centered, input_second_moment, second_moment_scale
from torch_kfac.blocks.switched import SwitchedForwardBlock
from torch_kfac.linalg import symmetric_eigh

#: Every factor pair a block can have; a block uses ("in", "out") or ("q", "k", "v", "out").
PAIR_NAMES = ("in", "q", "k", "v", "out")
_ALL_FACTORS = tuple(f"{kind}_{pair}" for pair in PAIR_NAMES for kind in "AG")
_CACHES = ("inv", "eigvals", "eigvecs")

#: A site's output columns feeding one pair: (pair name, first column, end column).
ColumnSlice = tuple[str, int, int]


@dataclass(frozen=True)
class ProjectionPair:
    """One Kronecker pair: the linear map `name` with `d_out` outputs, `d_in` inputs and maybe a bias."""

    name: str
    d_out: int
    d_in: int
    bias: bool

    @property
    def numel(self) -> int:
        """Size of its [weight, bias] matrix (d_out, d_in [+1]) in the packed layout."""
        return self.d_out * (self.d_in + int(self.bias))


def _float_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask as an additive float mask (-inf where True), as `nn.MultiheadAttention` does."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")
    return mask


def _with_bias(weight: Tensor, bias: Tensor | None) -> Tensor:
    """[W, b] as one (d_out, d_in [+1]) matrix."""
    return weight if bias is None else torch.cat([weight, bias.unsqueeze(-1)], dim=-1)


def _split_qkv(packed: Tensor, embed_dim: int) -> tuple[Tensor, ...]:
    """(T, N, k E) projection output -> k contiguous (T, N, E) tensors, as torch splits it."""
    parts = packed.shape[-1] // embed_dim
    split = packed.unflatten(-1, (parts, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    return tuple(split[i] for i in range(parts))


def _checked_attn_mask(
    attn_mask: Tensor | None, tgt_len: int, src_len: int, batch_heads: int
) -> Tensor | None:
    """A float attn_mask checked against the lengths, a 2-D one given a leading dimension."""
    if attn_mask is None:
        return None
    if attn_mask.dim() == 2:
        if attn_mask.shape != (tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
            )
        return attn_mask.unsqueeze(0)
    if attn_mask.dim() == 3:
        if attn_mask.shape != (batch_heads, tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                f"{(batch_heads, tgt_len, src_len)}."
            )
        return attn_mask
    raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")


def _attention_with_weights(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float, batch: int, average: bool
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d) + mask) v of (B H, T, d) heads as (T B, E), and the attention weights."""
    batch_heads, tgt_len, head_dim = q.shape
    heads, src_len = batch_heads // batch, k.shape[1]
    q_scaled = q * math.sqrt(1.0 / float(head_dim))
    if attn_mask is not None:
        scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
    else:
        scores = torch.bmm(q_scaled, k.transpose(-2, -1))
    weights = F.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    attended = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * batch, heads * head_dim)
    weights = weights.view(batch, heads, tgt_len, src_len)
    return attended, (weights.mean(dim=1) if average else weights)


def _fused_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float, batch: int, is_causal: bool
) -> Tensor:
    """The same attention through `F.scaled_dot_product_attention`, as (T B, E), without weights."""
    batch_heads, tgt_len, head_dim = q.shape
    heads, src_len = batch_heads // batch, k.shape[1]
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(batch, heads, -1, src_len)
    q = q.view(batch, heads, tgt_len, head_dim)
    k = k.view(batch, heads, src_len, head_dim)
    v = v.view(batch, heads, src_len, head_dim)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    return attended.permute(2, 0, 1, 3).reshape(batch * tgt_len, heads * head_dim)


class MultiheadAttentionBlock(SwitchedForwardBlock):
    """K-FAC block of `nn.MultiheadAttention`: one Kronecker pair per projection (see the module doc).

    The gradient layout (`pack`) is one flat vector: the [weight, bias] matrices of the pairs,
    each flattened row-major, in pair order. For the packed weight the in-projection part is the
    flattened [in_proj_weight, in_proj_bias] whether it forms one pair or three row blocks.

    While the block exists, the module's `forward` is an instance attribute (removed by `remove`).
    A subclass of `nn.MultiheadAttention` with its own forward is refused.
    """

    module: nn.MultiheadAttention

    #: Its submodule `out_proj` belongs to this block: the module never calls out_proj's forward,
    #: so a block of its own would never see statistics.
    OWNS_SUBMODULES: ClassVar[bool] = True

    def __init__(self, module: nn.Module, name: str = "") -> None:
        self._check_module(module, name)
        assert isinstance(module, nn.MultiheadAttention)
        self._packed = bool(module._qkv_same_embed_dim)
        #: Packed weight: whether the calls so far were self-attention (None before the first one).
        self._shared_input: bool | None = None if self._packed else False
        super().__init__(module, name)
        self._pending = {k: [] for k in _ALL_FACTORS}
        self.approximation, self.power, self.kfac_approx = "kfac", -1.0, "expand"
        self.attach()

    @staticmethod
    def _check_module(module: nn.Module, name: str) -> None:
        """Refuse what the re-implemented forward would not reproduce, and frozen parameters.

        Refused here, before the forward is switched, rather than built and then dropped.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(
                f"MultiheadAttentionBlock needs an nn.MultiheadAttention, got {type(module).__name__}"
            )
        skip = f"pass skip_modules=[{name!r}] to leave it to the plain update"
        if type(module).forward is not nn.MultiheadAttention.forward:
            raise ValueError(
                f"{type(module).__name__} {name!r} overrides forward(); K-FAC re-implements "
                f"MultiheadAttention's forward to see its projections and cannot reproduce yours: {skip}"
            )
        SwitchedForwardBlock.check_forward_attribute(module, name, "re-implementation")
        names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"]
        params = [getattr(module, n) for n in names] + [module.out_proj.weight, module.out_proj.bias]
        if not all(p.requires_grad for p in params if p is not None):
            raise ValueError("parameters frozen (requires_grad=False)")

    # ------------------------------------------------------------------------- layout
    def _shared(self) -> bool:
        """Whether the in-projection is one pair: the packed weight on a shared input."""
        if not self._packed:
            return False
        if "A_in_ema" in self.state:
            return True
        if "A_q_ema" in self.state:
            return False
        return self._shared_input is not False

    def pairs(self) -> tuple[ProjectionPair, ...]:
        """The Kronecker pairs of the current layout, in packing order."""
        m = self.module
        e, in_bias = m.embed_dim, m.in_proj_bias is not None
        out = ProjectionPair("out", e, e, m.out_proj.bias is not None)
        if self._shared():
            return ProjectionPair("in", 3 * e, e, in_bias), out
        return (
            ProjectionPair("q", e, e, in_bias),
            ProjectionPair("k", e, m.kdim, in_bias),
            ProjectionPair("v", e, m.vdim, in_bias),
            out,
        )

    @property
    def FACTORS(self) -> tuple[str, ...]:  # type: ignore[override]
        """The running factors of the current layout: A_<pair>, G_<pair>."""
        return tuple(f"{kind}_{p.name}" for p in self.pairs() for kind in "AG")

    @property
    def FORWARD_FACTORS(self) -> tuple[str, ...]:  # type: ignore[override]
        """The input factors A_<pair>, fed by the forward pass."""
        return tuple(f"A_{p.name}" for p in self.pairs())

    def _use_layout(self, shared: bool) -> None:
        """Fix the in-projection layout from a recorded call; refuse a module used both ways."""
        if not self._packed or shared == self._shared():
            return
        used = [
            k for k in self.FACTORS if not k.endswith("_out") and (self.has_factor(k) or self._pending[k])
        ]
        if used:
            kinds = ("cross-attention", "self-attention") if shared else ("self-attention", "cross-attention")
            raise ValueError(
                f"MultiheadAttention {self.name!r} was called for {kinds[0]} and now for {kinds[1]} "
                "(self-attention: query is key is value); its K-FAC block keeps one layout of "
                "in-projection factors. Use separate modules, or pass "
                f"skip_modules=[{self.name!r}]"
            )
        self._shared_input = shared

    def configure(
        self, approximation: str = "kfac", power: float = -1.0, kfac_approx: str = "expand"
    ) -> None:
        """Matrix power (-1 or -1/2) and weight-sharing rule ('expand' or 'reduce'); 'kfac' only."""
        if approximation != "kfac":
            self.remove()  # refused while the optimizer is being built: leave the module as it was
            raise ValueError(
                f"MultiheadAttention {self.name!r}: approximation={approximation!r} is not supported by "
                f"its K-FAC block (only 'kfac'); pass skip_modules=[{self.name!r}] to use the plain update"
            )
        if power not in (-1.0, -0.5):
            raise ValueError(f"power must be -1 or -0.5, got {power!r}")
        if kfac_approx not in ("expand", "reduce"):
            raise ValueError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}")
        self.approximation, self.power, self.kfac_approx = approximation, float(power), kfac_approx

    # ----------------------------------------------------------------------- parameters
    def parameters(self) -> list[Tensor]:
        """In-projection weight(s), in_proj_bias, out_proj.weight and out_proj.bias (those present)."""
        m = self.module
        weights = [m.in_proj_weight] if self._packed else [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
        params: list[Tensor | None] = [*weights, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias]
        return [p for p in params if p is not None]

    def unhandled_parameters(self) -> dict[str, str]:
        """Parameters of the module that the block leaves to the plain update, with the reason."""
        why = (
            "add_bias_kv: appended to the keys/values after the projections, no Kronecker factors "
            "(plain update)"
        )
        return {p: why for p in ("bias_k", "bias_v") if getattr(self.module, p) is not None}

    def pack(self, tensors: list[Tensor]) -> Tensor:
        """Parameter-shaped tensors (in `parameters()` order, None as zeros) as one flat vector."""
        params = self.parameters()
        if len(tensors) != len(params):
            raise ValueError(f"expected {len(params)} tensors (one per parameter), got {len(tensors)}")
        values = [torch.zeros_like(p) if t is None else t for t, p in zip(tensors, params, strict=True)]
        weights = values[:1] if self._packed else values[:3]
        rest = values[len(weights) :]
        in_bias = rest.pop(0) if self.module.in_proj_bias is not None else None
        out_weight, out_bias = rest[0], (rest[1] if len(rest) > 1 else None)
        if self._packed:
            biases: list[Tensor | None] = [in_bias]
        else:
            biases = list(in_bias.chunk(3)) if in_bias is not None else [None, None, None]
        mats = [_with_bias(w, b) for w, b in zip(weights, biases, strict=True)]
        mats.append(_with_bias(out_weight, out_bias))
        return torch.cat([mat.reshape(-1) for mat in mats])

    def unpack(self, mat: Tensor) -> list[Tensor]:
        """Inverse of `pack`: one tensor per parameter, in `parameters()` order."""
        m = self.module
        e, in_bias, out_bias = m.embed_dim, m.in_proj_bias is not None, m.out_proj.bias is not None
        shapes = [(3 * e, e)] if self._packed else [(e, e), (e, m.kdim), (e, m.vdim)]
        shapes.append((e, e))
        biased = [in_bias] * (len(shapes) - 1) + [out_bias]
        sizes = [rows * (cols + int(b)) for (rows, cols), b in zip(shapes, biased, strict=True)]
        weights, biases = [], []
        for chunk, (rows, cols), b in zip(mat.split(sizes), shapes, biased, strict=True):
            full = chunk.reshape(rows, cols + int(b))
            weights.append(full[:, :cols])
            biases.append(full[:, cols] if b else None)
        result = weights[:-1]
        if in_bias:
            result.append(torch.cat(biases[:-1]))
        result.append(weights[-1])
        if out_bias:
            result.append(biases[-1])
        return result

    def _pair_matrices(self, mat: Tensor) -> list[Tensor]:
        """The packed vector as one (d_out, d_in [+1]) matrix per pair of the current layout."""
        pairs = self.pairs()
        chunks = mat.split([p.numel for p in pairs])
        return [c.reshape(p.d_out, -1) for c, p in zip(chunks, pairs, strict=True)]

    # ----------------------------------------------------------------------- statistics
    def num_examples(self, inputs: tuple[Tensor, ...]) -> int:
        """N from the query: dim 0 (batch_first) or dim 1 of a 3-D query; 1 for an unbatched one."""
        return self._examples(inputs[0])

    def _examples(self, query: Tensor) -> int:
        """N of a query in the module's layout."""
        if query.dim() != 3:
            return 1
        return int(query.shape[0] if self.module.batch_first else query.shape[1])

    def observe_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """N of the call's query."""
        query = args[0] if args else kwargs.get("query")
        if isinstance(query, Tensor):
            self.batch_size = self._examples(query)

    def recording_forward(self, *args: Any, keep: list[Tensor] | None = None, **kwargs: Any) -> Any:
        """`attention_forward`, recording the projections' statistics."""
        return self.attention_forward(*args, record=True, keep=keep, **kwargs)

    def _statistic_rows(
        self, x: Tensor, steps: int, batch: int, pool: Callable[..., Tensor]
    ) -> tuple[Tensor, int]:
        """A projection's input or output gradient laid out (T, N, d) as statistic rows, and N.

        Rows (N T, d) ('expand'), or one row per example pooled over its T positions by `pool`
        ('reduce': the mean of inputs, the sum of output gradients); centered if `center`.
        """
        rows = x.detach().reshape(steps, batch, -1).transpose(0, 1)  # (N, T, d)
        if self.kfac_approx == "reduce":
            rows = pool(rows, dim=1, keepdim=True)
        n, t, d = rows.shape
        flat = rows.reshape(n * t, d)
        return (centered(flat) if self.center else flat), n

    def _record_activations(
        self, x: Tensor, names: tuple[str, ...], steps: int, batch: int, bias: bool
    ) -> None:
        """Pend 1/(N T) sum [a, 1][a, 1]^T of a projection input laid out (T, N, d) for the pairs."""
        flat, n = self._statistic_rows(x, steps, batch, torch.mean)
        moment = input_second_moment(flat, bias)
        for name in names:
            self.add_forward_statistic(f"A_{name}", moment, n)

    def _record_output_grad(
        self, columns: tuple[ColumnSlice, ...], steps: int, batch: int, grad: Tensor
    ) -> None:
        """Tensor hook: add s sum g g^T of the projection's output gradient (T, N, d) to each pair's G."""
        if self.backward_gate is not None and not self.backward_gate():
            return
        flat, n = self._statistic_rows(self.statistics_grad(grad), steps, batch, torch.sum)
        scale = second_moment_scale(self.reduction, n, self.loss_terms)
        for name, start, end in columns:
            part = flat[:, start:end]
            self.add_backward_statistic(f"G_{name}", part.mT @ part * scale, n)

    def _project(
        self,
        x: Tensor,
        weights: tuple[Tensor, ...],
        biases: tuple[Tensor | None, ...],
        columns: tuple[ColumnSlice, ...],
        steps: int,
        batch: int,
        record: bool,
        keep: list[Tensor] | None,
    ) -> Tensor:
        """F.linear(x, weight, bias) of one projection, its statistics recorded when `record`.

        Several (weight, bias) row blocks are projected one by one and concatenated: the unbatched
        self-attention case, which torch projects block by block but which is one Kronecker pair.
        """
        outs = [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if not record:
            return y
        bias = biases[0] is not None
        self._record_activations(x, tuple(name for name, _, _ in columns), steps, batch, bias)
        if y.requires_grad:
            y.register_hook(partial(self._record_output_grad, columns, steps, batch))
            if keep is not None:
                # The preconditioner's own backward passes stop at `y`; the rest of the computation
                # gets a copy, so that an in-place operation downstream cannot rebase the kept tensor.
                keep.append(y)
                return y * 1
        return y

    # ------------------------------------------------------------------------ forward
    def attention_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        record: bool = False,
        keep: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """`nn.MultiheadAttention.forward` (slow path) with the projections as explicit F.linear calls.

        The same operations in the same order as `F.multi_head_attention_forward`, so the outputs,
        gradients and dropout draws are the module's own; with `record` the projections' statistics
        are recorded (and, when `keep` is a list, their outputs appended to it).
        """
        m = self.module
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError(f"MultiheadAttention {self.name!r}: K-FAC does not support nested tensors")
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key and value must all be 2-D (unbatched) or all 3-D (batched), got "
                f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D"
            )
        is_batched = query.dim() == 3
        if key_padding_mask is not None and key_padding_mask.dim() != (2 if is_batched else 1):
            raise ValueError(
                f"key_padding_mask must be {2 if is_batched else 1}-D, got {key_padding_mask.dim()}-D"
            )
        key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        attn_mask = _float_mask(attn_mask, "attn_mask", query.dtype)
        # Decided on the caller's tensors: torch's own unsqueeze of unbatched inputs breaks identity.
        shared_input = query is key and key is value
        kv_shared = key is value
        if record:
            self._use_layout(shared_input)
        if m.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if embed_dim != m.embed_dim:
            raise ValueError(f"was expecting embedding dimension of {m.embed_dim}, but got {embed_dim}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}"
            )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                "method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
        heads = m.num_heads
        head_dim = embed_dim // heads

        # In-projections. Rows of every projection input and output are laid out (T, N, d).
        project = partial(self._project, batch=bsz, record=record, keep=keep)
        sharing = (shared_input, kv_shared, is_batched)
        q, k, v = self._in_projections(project, query, key, value, sharing, (tgt_len, src_len))
        attn_mask = _checked_attn_mask(attn_mask, tgt_len, src_len, bsz * heads)

        if m.bias_k is not None and m.bias_v is not None:
            k = torch.cat([k, m.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, m.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        # Heads: (B H, T, head_dim).
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if m.add_zero_attn:
            zeros = (bsz * heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise ValueError(
                    f"key_padding_mask must have shape {(bsz, src_len)}, got {tuple(key_padding_mask.shape)}"
                )
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len)
                .expand(-1, heads, -1, -1)
                .reshape(bsz * heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = m.dropout if m.training else 0.0

        if need_weights:
            attended, weights = _attention_with_weights(
                q, k, v, attn_mask, dropout_p, bsz, average_attn_weights
            )
        else:
            attended, weights = _fused_attention(q, k, v, attn_mask, dropout_p, bsz, is_causal), None
        out_proj = m.out_proj
        output = project(attended, (out_proj.weight,), (out_proj.bias,), (("out", 0, embed_dim),), tgt_len)
        output = output.view(tgt_len, bsz, output.size(1))
        if not is_batched:
            output = output.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        elif m.batch_first:
            output = output.transpose(1, 0)
        return output, weights

    def _in_projections(
        self,
        project: Callable[..., Tensor],
        query: Tensor,
        key: Tensor,
        value: Tensor,
        sharing: tuple[bool, bool, bool],
        lengths: tuple[int, int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k and v (T, N, E) as `F.multi_head_attention_forward` projects them, through `project`.

        `sharing` is (query is key is value, key is value, batched input) as the caller passed
        them; `lengths` the target and source lengths.
        """
        m = self.module
        shared_input, kv_shared, is_batched = sharing
        tgt_len, src_len = lengths
        w, b, e = m.in_proj_weight, m.in_proj_bias, m.embed_dim
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        if self._packed and shared_input and is_batched:
            proj = project(query, (w,), (b,), (("in", 0, 3 * e),), tgt_len)
            return _split_qkv(proj, e)
        if self._packed and shared_input:
            # torch's unsqueeze of unbatched inputs breaks `query is key`: it projects block by block.
            proj = project(query, w.chunk(3), (b_q, b_k, b_v), (("in", 0, 3 * e),), tgt_len)
            return _split_qkv(proj, e)
        if self._packed and kv_shared and is_batched:
            w_q, w_kv = w.split([e, 2 * e])
            b_q, b_kv = (None, None) if b is None else b.split([e, 2 * e])
            q = project(query, (w_q,), (b_q,), (("q", 0, e),), tgt_len)
            kv = project(key, (w_kv,), (b_kv,), (("k", 0, e), ("v", e, 2 * e)), src_len)
            k, v = _split_qkv(kv, e)
            return q, k, v
        if self._packed:
            w_q, w_k, w_v = w.chunk(3)
        else:
            w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        q = project(query, (w_q,), (b_q,), (("q", 0, e),), tgt_len)
        k = project(key, (w_k,), (b_k,), (("k", 0, e),), src_len)
        v = project(value, (w_v,), (b_v,), (("v", 0, e),), src_len)
        return q, k, v

    # ---------------------------------------------------------------- preconditioning
    def factors(self) -> dict[str, Tensor]:
        """The estimated factors of the current layout by name (A_<pair>, G_<pair>)."""
        return {k: self._factor(k) for k in self.FACTORS if self.has_factor(k)}

    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """Refresh each pair's damped inverses ('cholesky') or eigendecompositions ('eigh').

        With 'cholesky' the factored damping (A + pi sqrt(l) I) (x) (G + sqrt(l)/pi I), pi per pair,
        is baked into the inverses; with 'eigh' the damping is applied at preconditioning time.
        """
        self.drop_state(f"{factor}_{cache}" for factor in _ALL_FACTORS for cache in _CACHES)
        if method == "cholesky" and self.power != -1.0:
            raise ValueError("inverse power -1/2 needs inverse_method='eigh'")
        for pair in self.pairs():
            a, g = self._factor(f"A_{pair.name}"), self._factor(f"G_{pair.name}")
            if method == "cholesky":
                inverses = damped_kronecker_inverses(a, g, damping, pi_correction)
                self.state[f"A_{pair.name}_inv"], self.state[f"G_{pair.name}_inv"] = inverses
            else:
                self.state[f"A_{pair.name}_eigvals"], self.state[f"A_{pair.name}_eigvecs"] = symmetric_eigh(a)
                self.state[f"G_{pair.name}_eigvals"], self.state[f"G_{pair.name}_eigvecs"] = symmetric_eigh(g)

    def has_inverses(self) -> bool:
        """Whether every pair has cached inverses or eigendecompositions."""
        return all(
            f"A_{p.name}_inv" in self.state or f"A_{p.name}_eigvecs" in self.state for p in self.pairs()
        )

    def _precondition_pair(
        self, name: str, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str
    ) -> Tensor:
        """(A (x) G + damping)^power of one pair applied to its (d_out, d_in [+1]) gradient matrix."""
        if f"A_{name}_inv" in self.state:  # (G + d_G I)^-1 M (A + d_A I)^-1
            return self.state[f"G_{name}_inv"] @ mat @ self.state[f"A_{name}_inv"]
        eigen = tuple(self.state[f"{k}_{name}_{c}"] for k in "AG" for c in ("eigvals", "eigvecs"))
        factors = (self._factor(f"A_{name}"), self._factor(f"G_{name}"))
        return kronecker_power(mat, factors, eigen, damping, pi_correction, damping_type, self.power)

    def precondition(
        self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str = "factored"
    ) -> Tensor:
        """Each pair's damped inverse curvature applied to its part of the packed gradient."""
        parts = [
            self._precondition_pair(p.name, m, damping, pi_correction, damping_type).reshape(-1)
            for p, m in zip(self.pairs(), self._pair_matrices(mat), strict=True)
        ]
        return torch.cat(parts)

    def curvature_product(self, mat: Tensor) -> Tensor:
        """The undamped curvature, G M A for each pair, applied to a packed vector."""
        parts = [
            (self._factor(f"G_{p.name}") @ m @ self._factor(f"A_{p.name}")).reshape(-1)
            for p, m in zip(self.pairs(), self._pair_matrices(mat), strict=True)
        ]
        return torch.cat(parts)

    def extra_repr(self) -> str:
        """Factor shapes and memory, for the registration report."""
        parts, numel = [], 0
        for p in self.pairs():
            d_in = p.d_in + int(p.bias)
            parts.append(f"A_{p.name} {d_in}x{d_in}, G_{p.name} {p.d_out}x{p.d_out}")
            numel += d_in * d_in + p.d_out * p.d_out
        size = numel * self.module.out_proj.weight.element_size()
        return f"{', '.join(parts)}, {size / 2**20:.2f} MiB per factor set"
