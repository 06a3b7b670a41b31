"""The K-FAC update rule as functions of their inputs (the optimizer owns the state they update).

For a block with gradient matrix g and preconditioner P = (A (x) G + damping)^-1:

* momentum_type='regular' (tensorflow/kfac): v <- mu v + c P g, update = v, where c is the norm
  constraint's clip coefficient min(1, sqrt(C / (lr^2 g^T P g))).
* momentum_type='adam' (tensorflow/kfac's "adam"): v <- mu v + g, update = c P v, with
  c = min(1, sqrt(C / (lr^2 v^T P v))).

Then theta <- theta - lr (update + weight_decay theta) (decoupled weight decay). Parameters
without a curvature block get the same rule with P = I.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from torch_kfac.blocks import CurvatureBlock
from torch_kfac.options import MomentumType


def velocity(state: MutableMapping[str, Any], vec: Tensor, mu: float, taken: Tensor | None = None) -> Tensor:
    """v <- mu v + vec, kept in `state['momentum_buffer']` (no buffer when mu == 0).

    With `taken`, a 0-d bool tensor, the buffer is left as it was where it is False (a step
    skipped on the device; a buffer started in such a step starts at zero).
    """
    if mu == 0:
        return vec
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = state["momentum_buffer"] = vec.clone() if taken is None else torch.where(taken, vec, 0.0)
    elif taken is None:
        buf.mul_(mu).add_(vec)
    else:
        buf.copy_(torch.where(taken, buf.mul(mu).add(vec), buf))
    return buf


def clip(
    vecs: Mapping[str, Tensor], natural: dict[str, Tensor], lr: float, bound: float | None
) -> dict[str, Tensor]:
    """Scale natural gradients by min(1, sqrt(C / (lr^2 vec^T F^-1 vec))), without a host sync."""
    if bound is None or not natural:
        return natural
    sq_norm = lr**2 * sum((vecs[n] * natural[n]).sum() for n in natural)
    ratio = bound / sq_norm
    coeff = torch.where(sq_norm > 0, ratio.sqrt().clamp(max=1.0), torch.ones_like(ratio))
    return {n: v * coeff for n, v in natural.items()}


def block_updates(
    mats: Mapping[str, Tensor],
    precondition: Callable[[Mapping[str, Tensor]], dict[str, Tensor]],
    states: Mapping[str, MutableMapping[str, Any]],
    momentum_type: MomentumType,
    lr: float,
    mu: float,
    bound: float | None,
    taken: Tensor | None = None,
) -> dict[str, Tensor]:
    """The update direction of every block (before lr and weight decay), by block name.

    `precondition(mats)` applies every block's P (at once: in distributed runs the results are
    broadcast in buckets); `states[name]` holds a block's momentum buffer (masked with `taken`,
    see `velocity`).
    """
    if momentum_type == MomentumType.REGULAR:
        natural = clip(mats, precondition(mats), lr, bound)
        return {n: velocity(states[n], v, mu, taken) for n, v in natural.items()}
    velocities = {n: velocity(states[n], m, mu, taken) for n, m in mats.items()}
    return clip(velocities, precondition(velocities), lr, bound)


def parameter_change(param: Tensor, update: Tensor, lr: float, weight_decay: float) -> Tensor:
    """-lr (update + weight_decay * param)."""
    if weight_decay:
        update = update + weight_decay * param
    return -lr * update


def per_parameter(
    blocks: Mapping[str, CurvatureBlock], mats: Mapping[str, Tensor]
) -> Iterator[tuple[Tensor, Tensor]]:
    """(parameter, its part) for every block matrix in `mats`, split with the block's `unpack`."""
    for name, mat in mats.items():
        block = blocks[name]
        yield from zip(block.parameters(), block.unpack(mat), strict=True)
