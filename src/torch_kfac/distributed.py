"""K-FAC on `torch.distributed`: averaged curvature, inverse work spread over ranks, broadcasts.

Active when `torch.distributed` is initialized with more than one rank (any backend: gloo on CPUs,
NCCL on GPUs); a single process never touches this module's communication. What happens per step:

* Statistics. On a factor-update step every rank records the statistics of its own shard; before
  they are folded into the running factors they are averaged over ranks (one all-reduce of one
  flat buffer per dtype, in the factors' precision; symmetric factors send only their upper
  triangle). With equal shards the running factors then equal those of the concatenated batch
  on every rank. Nothing is communicated on other steps.
* Inverses. Each block's inverse or eigendecomposition is computed by one rank, its *owner*, chosen
  by a greedy cost balance (largest cost first to the least loaded rank, cost = sum of d^3 over
  the block's square factors, as in KAISA). `grad_worker_fraction` f decides who else holds it.
  The world of W ranks is laid out as a grid of g = f W rows by C = W / g columns (rank
  r = row * C + column); a block belongs to its owner's column:
    - the owner broadcasts the block's inverses to the g ranks of its column (its *grad workers*),
      which precondition that block's gradient;
    - in each row the grad worker of the block broadcasts the preconditioned gradient to the
      other C - 1 ranks of the row.
  f = 1 (C = 1): every rank holds every inverse and preconditions locally (no gradient traffic;
  KAISA's COMM-OPT). f = 1/W (g = 1): only the owner holds a block's inverses and broadcasts
  its preconditioned gradient (no inverse traffic, 1/W of the inverse memory; MEM-OPT). In
  between, the hybrid. Blocks whose statistics depend on their inverses (EKFAC's eigenbasis)
  get their inverses on every rank whatever f is.
* Adaptive steps. Losses and exact-curvature Gram matrices are averaged over ranks
  (`average`), so the damping rule, the quadratic model and step rejection decide the same on
  every rank; MC-Fisher labels are drawn from a generator seeded identically on every rank
  for the whole (padded) global batch, each rank keeping its rows.

Every rank must run the same layers on a factor-update step (the buffers of the all-reduce must
agree) and hold an equal share of the batch (the average of per-rank statistics is then the
statistic of the concatenated batch).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torch_kfac.blocks.base import CurvatureBlock
from torch_kfac.options import check_fraction

#: Key of the global state that records, per block, the state entries an inverse update writes
#: (name -> {key: (shape, dtype)}); kept there so that a checkpoint carries it.
LAYOUT_KEY = "inverse_layout"


def is_distributed() -> bool:
    """Whether `torch.distributed` is initialized with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a `DistributedDataParallel` wrapper (block names without `module.`)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def check_model(model: nn.Module) -> None:
    """Refuse models whose parameters are sharded over ranks (FSDP), with what is supported."""
    # FSDP is looked up only if already imported (a wrapped model implies it; importing it costs seconds).
    module = sys.modules.get("torch.distributed.fsdp")
    fsdp = tuple(getattr(module, n) for n in ("FSDPModule", "FullyShardedDataParallel") if hasattr(module, n))
    sharded = [name for name, m in model.named_modules() if fsdp and isinstance(m, fsdp)]
    sharded += [name for name, p in model.named_parameters() if type(p).__name__ == "DTensor"]
    if sharded:
        raise ValueError(
            f"K-FAC does not support sharded parameters (FSDP / fully_shard / DTensor: {sharded[0]!r}): "
            "its Kronecker factors need each layer's whole weight. Supported: a model replicated on "
            "every rank, wrapped in DistributedDataParallel or with gradients all-reduced by hand"
        )


def block_cost(block: CurvatureBlock) -> float:
    """Cost of a block's inverse update: sum of batch * d^3 over its square factors (numel otherwise)."""
    cost = 0.0
    for key in block.FACTORS:
        factor = block.state.get(f"{key}_ema")
        if factor is None:
            continue
        if factor.dim() >= 2 and factor.shape[-1] == factor.shape[-2]:
            cost += factor[..., 0, 0].numel() * float(factor.shape[-1]) ** 3
        else:
            cost += factor.numel()
    return cost


def greedy_assignment(
    costs: dict[str, float], world: int, loads: list[float] | None = None
) -> dict[str, int]:
    """Largest cost first, each to the least loaded rank (ties: lower rank, then name order)."""
    loads = [0.0] * world if loads is None else loads
    owners = {}
    for name in sorted(costs, key=lambda n: -costs[n]):
        rank = min(range(world), key=lambda r: loads[r])
        owners[name] = rank
        loads[rank] += costs[name]
    return owners


class DistributedCurvature:
    """Communication of a `KFACPreconditioner` on the default process group.

    Args:
        grad_worker_fraction: fraction f of the ranks that hold a block's inverses and
            precondition its gradient (see the module docstring); f * world_size must divide the
            world size.
        reduce_upper_triangle: send only the upper triangle of symmetric statistics (half the
            bytes, for a pack and unpack); None: on GPUs only, where the packing runs at memory
            bandwidth, far above the network's (on CPUs it cost more than it saved, see
            benchmarks/results/distributed_scale.md).
    """

    def __init__(self, grad_worker_fraction: float = 1.0, reduce_upper_triangle: bool | None = None) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.fraction = check_fraction("grad_worker_fraction", grad_worker_fraction)
        workers = max(1, round(self.fraction * self.world))
        if self.world % workers:
            raise ValueError(
                f"grad_worker_fraction={grad_worker_fraction} gives {workers} grad workers per block, "
                f"which does not divide the world size {self.world}"
            )
        self.rows, self.columns = workers, self.world // workers
        self.reduce_upper_triangle = reduce_upper_triangle
        # Every rank creates every group, in the same order (new_group is collective).
        self._column_groups = [
            self._group([r * self.columns + c for r in range(self.rows)]) for c in range(self.columns)
        ]
        self._row_groups = [
            self._group([r * self.columns + c for c in range(self.columns)]) for r in range(self.rows)
        ]
        self.owners: dict[str, int] = {}
        self._loads = [0.0] * self.world
        self._symmetric: dict[Any, bool] = {}
        #: Payload bytes this rank has put into or received from collectives, by phase.
        self.bytes: Counter[str] = Counter()

    def _group(self, ranks: list[int]) -> tuple[list[int], Any]:
        if len(ranks) == self.world:
            return ranks, None  # the default group
        return ranks, dist.new_group(ranks) if len(ranks) > 1 else None

    # ------------------------------------------------------------------------ scalars
    def average(self, tensor: Tensor) -> Tensor:
        """Mean over ranks of a (small) tensor: losses and Gram matrices of the adaptive steps."""
        out = tensor.detach().clone()
        dist.all_reduce(out)
        self.bytes["scalars"] += out.numel() * out.element_size()
        return out / self.world

    def shared_seed(self) -> int:
        """Rank 0's initial seed, on every rank."""
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        seed = torch.tensor([torch.initial_seed() % 2**62], dtype=torch.int64, device=device)
        dist.broadcast(seed, 0)
        return int(seed.item())

    # --------------------------------------------------------------------- statistics
    def _is_symmetric(self, key: Any, value: Tensor) -> bool:
        """Whether a statistic is a stack of symmetric matrices (checked once per key)."""
        if key not in self._symmetric:
            square = value.dim() >= 2 and value.shape[-1] == value.shape[-2] and value.shape[-1] > 1
            symmetric = False
            if square:
                # Agree over ranks: every rank must pack the same way.
                # Symmetric up to the rounding of X^T X (relative to the largest entry).
                scale = value.abs().max()
                local = bool((value - value.mT).abs().max() <= 1e-5 * scale) if scale > 0 else True
                flag = torch.tensor(float(local), device=value.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                symmetric = bool(flag)
            self._symmetric[key] = symmetric
        if self.reduce_upper_triangle is None:  # auto: where packing runs at memory bandwidth
            return self._symmetric[key] and value.device.type == "cuda"
        return self._symmetric[key] and self.reduce_upper_triangle

    def average_statistics(self, stats: dict[Any, Tensor]) -> dict[Any, Tensor]:
        """The statistics averaged over ranks: one all-reduce per dtype, upper triangles of
        symmetric ones only. Every rank must pass the same keys with the same shapes."""
        packed: dict[torch.dtype, list[tuple[Any, Tensor, Tensor | None]]] = {}
        for key, value in stats.items():
            index = None
            if self._is_symmetric(key, value):
                n = value.shape[-1]
                index = torch.triu_indices(n, n, device=value.device)
                # A 1-d gather of the flattened matrices is ~4x faster than 2-d fancy indexing.
                flat = value.reshape(-1, n * n).index_select(1, index[0] * n + index[1]).reshape(-1)
            else:
                flat = value.reshape(-1)
            packed.setdefault(value.dtype, []).append((key, flat, index))
        out: dict[Any, Tensor] = {}
        for dtype in sorted(packed, key=str):
            items = packed[dtype]
            buffer = torch.cat([flat for _, flat, _ in items])
            dist.all_reduce(buffer)
            self.bytes["factors"] += buffer.numel() * buffer.element_size()
            buffer /= self.world
            offset = 0
            for key, flat, index in items:
                part = buffer[offset : offset + flat.numel()]
                offset += flat.numel()
                value = stats[key]
                if index is None:
                    out[key] = part.view(value.shape)
                    continue
                full = value.new_empty(value.shape)
                upper = part.view(*value.shape[:-2], -1)
                full[..., index[0], index[1]] = upper
                full[..., index[1], index[0]] = upper
                out[key] = full
        return out

    # -------------------------------------------------------------------- assignment
    def assign(self, blocks: dict[str, CurvatureBlock], names: Iterable[str]) -> None:
        """Give owners to blocks that have none yet (greedy on the current loads)."""
        new = {n: block_cost(blocks[n]) for n in names if n not in self.owners}
        if new:
            self.owners.update(greedy_assignment(new, self.world, self._loads))

    def column_of(self, name: str) -> int:
        """The grid column of a block: that of its owner."""
        return self.owners[name] % self.columns

    def _column_ranks(self, name: str) -> list[int]:
        return self._column_groups[self.column_of(name)][0]

    def computes(
        self, blocks: dict[str, CurvatureBlock], due: list[str], layouts: dict[str, Any]
    ) -> list[str]:
        """The due blocks this rank refreshes: its own, and all of them the first time.

        The first refresh of a block runs on every rank (identical inputs, identical results), so
        that every rank learns which state entries the refresh writes; later ones run on the owner.
        """
        self.assign(blocks, due)
        return [n for n in due if n not in layouts or self.owners[n] == self.rank]

    def holders(self, blocks: dict[str, CurvatureBlock], name: str, layouts: dict[str, Any]) -> list[int]:
        """Ranks that keep block `name`'s inverses."""
        factor_keys = {f"{k}_{s}" for k in blocks[name].FACTORS for s in ("ema", "weight")}
        if factor_keys & set(layouts.get(name, {})):
            return list(range(self.world))
        return self._column_ranks(name)

    def share_inverses(
        self,
        blocks: dict[str, CurvatureBlock],
        due: list[str],
        previous: dict[str, dict[str, Tensor]],
        layouts: dict[str, Any],
    ) -> None:
        """After the refresh: record first layouts, broadcast owners' inverses to their holders,
        and drop inverses this rank does not hold."""
        first = [n for n in due if n not in layouts]
        for name in first:
            block = blocks[name]
            if not block.has_inverses():
                continue  # the first refresh failed on every rank alike: try again next time
            old = previous[name]
            layouts[name] = {
                k: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
                for k, t in block.state.items()
                if old.get(k) is not t
            }
            if self.rank not in self.holders(blocks, name, layouts):
                self._drop(block, layouts[name])
        shared = [n for n in due if n not in first and n in layouts]
        for name in shared:
            if self.owners[name] == self.rank:
                # Holders receive row-major copies; an owner preconditioning with its own layout (a
                # Cholesky inverse comes column-major) would round differently and the ranks drift.
                state = blocks[name].state
                for key in layouts[name]:  # the entries the broadcast below sends
                    state[key] = state[key].contiguous()
        received = self._broadcast_inverses(blocks, shared, layouts, everyone=False)
        for name, entries in received.items():
            blocks[name].state.update(entries)

    def _drop(self, block: CurvatureBlock, keys: dict[str, Any]) -> None:
        for key in keys:
            block.state.pop(key, None)

    def _broadcast_inverses(
        self, blocks: dict[str, CurvatureBlock], names: list[str], layouts: dict[str, Any], everyone: bool
    ) -> dict[str, dict[str, Tensor]]:
        """Owners broadcast the inverse entries of `names` to their holders (to all ranks if
        `everyone`); returns what this rank received. One bucket per (owner, group, dtype)."""
        plan: dict[tuple[int, tuple[int, ...]], list[str]] = {}
        for name in names:
            ranks = list(range(self.world)) if everyone else self.holders(blocks, name, layouts)
            if len(ranks) > 1:
                plan.setdefault((self.owners[name], tuple(ranks)), []).append(name)
        received: dict[str, dict[str, Tensor]] = {}
        pending = []
        for (src, ranks), members in sorted(plan.items()):
            if self.rank not in ranks:
                continue
            group = self._group_for(list(ranks))
            entries = [
                (n, k, shape, getattr(torch, dtype))
                for n in members
                for k, (shape, dtype) in layouts[n].items()
            ]
            by_dtype: dict[torch.dtype, list[tuple[str, str, tuple[int, ...]]]] = {}
            for n, k, shape, dtype in entries:
                by_dtype.setdefault(dtype, []).append((n, k, tuple(shape)))
            for dtype in sorted(by_dtype, key=str):
                items = by_dtype[dtype]
                device = blocks[items[0][0]].parameters()[0].device
                if self.rank == src:
                    buffer = torch.cat([blocks[n].state[k].reshape(-1).to(dtype) for n, k, _ in items])
                else:
                    size = sum(math.prod(shape) for _, _, shape in items)
                    buffer = torch.empty(size, dtype=dtype, device=device)
                work = dist.broadcast(buffer, src, group=group, async_op=True)
                self.bytes["inverses"] += buffer.numel() * buffer.element_size()
                pending.append((work, src, buffer, items))
        for work, src, buffer, items in pending:
            work.wait()
            if self.rank == src:
                continue
            for (n, k, _), value in zip(
                items, _unflatten(buffer, [shape for *_, shape in items]), strict=True
            ):
                received.setdefault(n, {})[k] = value
        return received

    def _group_for(self, ranks: list[int]) -> Any:
        if len(ranks) == self.world:
            return None
        for members, group in (*self._column_groups, *self._row_groups):
            if members == ranks:
                return group
        raise AssertionError(f"no process group for ranks {ranks}")

    # ----------------------------------------------------------------- preconditioning
    def precondition(
        self, mats: dict[str, Tensor], precondition: Callable[[str, Tensor], Tensor], layouts: dict[str, Any]
    ) -> dict[str, Tensor]:
        """Preconditioned gradients of every block: computed by the block's grad workers, then
        broadcast along each row of the grid (nothing to send when f = 1)."""
        out: dict[str, Tensor] = {}
        row = self.rank // self.columns
        by_column: dict[int, list[str]] = {}
        for name, mat in mats.items():
            if self.columns == 1 or name not in layouts:
                out[name] = precondition(name, mat)  # f = 1, or no inverses yet (the raw gradient)
                continue
            column = self.column_of(name)
            by_column.setdefault(column, []).append(name)
            if column == self.rank % self.columns:
                out[name] = precondition(name, mat)
        members, group = self._row_groups[row]
        pending = []
        for column in sorted(by_column):
            src = members[column]
            names = by_column[column]
            by_dtype: dict[torch.dtype, list[str]] = {}
            for name in names:
                by_dtype.setdefault(mats[name].dtype, []).append(name)
            for dtype in sorted(by_dtype, key=str):
                items = by_dtype[dtype]
                if self.rank == src:
                    buffer = torch.cat([out[n].reshape(-1) for n in items])
                else:
                    buffer = mats[items[0]].new_empty(sum(mats[n].numel() for n in items))
                work = dist.broadcast(buffer, src, group=group, async_op=True)
                self.bytes["gradients"] += buffer.numel() * buffer.element_size()
                pending.append((work, src, buffer, items))
        for work, src, buffer, items in pending:
            work.wait()
            if self.rank == src:
                continue
            out.update(zip(items, _unflatten(buffer, [mats[n].shape for n in items]), strict=True))
        return {name: out[name] for name in mats}

    # ---------------------------------------------------------------------- checkpoints
    def gather_inverses(
        self, blocks: dict[str, CurvatureBlock], layouts: dict[str, Any]
    ) -> dict[str, dict[str, Tensor]]:
        """Collective: the inverse entries of every block this rank does not hold, from their owners."""
        names = [n for n in blocks if layouts.get(n)]
        self.assign(blocks, names)
        return self._broadcast_inverses(blocks, names, layouts, everyone=True)

    def after_load(self, blocks: dict[str, CurvatureBlock], layouts: dict[str, Any]) -> None:
        """After loading a (complete) checkpoint: assign owners and keep only this rank's inverses."""
        names = [n for n in blocks if n in layouts]
        self.assign(blocks, names)
        for name in names:
            if self.rank not in self.holders(blocks, name, layouts):
                self._drop(blocks[name], layouts[name])

    # ------------------------------------------------------------------------ sampling
    def sample_targets(
        self,
        sample: Callable[[Tensor, Tensor, torch.Generator], Tensor],
        outputs: Tensor,
        targets: Tensor,
        generator: torch.Generator,
    ) -> Tensor:
        """This rank's rows of labels sampled for the whole global batch.

        The samplers draw one random number per entry in row-major order, whatever the values, so
        sampling a batch of W copies of the local outputs with the shared generator and keeping
        this rank's rows gives the labels the single process draws for the concatenated batch.
        """
        n = outputs.shape[0]
        padded_out = outputs.detach().repeat(self.world, *([1] * (outputs.dim() - 1)))
        padded_tgt = targets.repeat(self.world, *([1] * (targets.dim() - 1)))
        return sample(padded_out, padded_tgt, generator)[self.rank * n : (self.rank + 1) * n]


def _unflatten(buffer: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    """Views of a flat broadcast buffer, one per shape, in order (the inverse of a concatenation)."""
    pieces = buffer.split([math.prod(shape) for shape in shapes])
    return [piece.view(shape) for piece, shape in zip(pieces, shapes, strict=True)]
