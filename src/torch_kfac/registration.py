"""Which module gets which curvature block: registration, weight tying and the report of who has none.

Every submodule whose type has a registered block gets one, unless it is skipped, frozen, refused
by its block type, or part of an enclosing module's block. A parameter shared by two modules gets
a tied block where the blocks support it (an embedding tied to an output projection), otherwise
both modules fall back to the plain update.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor, nn

from torch_kfac.blocks import CurvatureBlock, block_type_for
from torch_kfac.blocks.tied import TiedBlock, supports_tying


def make_blocks(model: nn.Module, skip: Iterable[str]) -> tuple[dict[str, CurvatureBlock], dict[str, str]]:
    """One block per supported module; reasons for each module left to the fallback."""
    registration = _Registration(set(skip))
    unknown = registration.skip - {name for name, _ in model.named_modules()}
    if unknown:
        raise ValueError(f"skip_modules names modules the model does not have: {sorted(unknown)}")
    for name, module in model.named_modules():
        registration.visit(name, module)
    return registration.blocks, registration.reasons


class _Registration:
    """One pass over a model's modules, in order: the blocks so far and who owns each parameter."""

    def __init__(self, skip: set[str]) -> None:
        self.skip = skip
        self.blocks: dict[str, CurvatureBlock] = {}
        self.reasons: dict[str, str] = {}
        self.owner: dict[int, str] = {}  # id(parameter) -> name of its block
        #: Modules whose block type owns their submodules -> why they have no block (None: they have one).
        self.enclosing: dict[str, str | None] = {}

    def visit(self, name: str, module: nn.Module) -> None:
        outer = next((o for o in self.enclosing if name.startswith(f"{o}.") or (o == "" and name)), None)
        if outer is not None:
            # Part of the enclosing module's block (MultiheadAttention's out_proj, whose forward the
            # attention never calls: a block of its own would never see statistics).
            if name in self.skip:
                raise ValueError(f"skip_modules: {name!r} is part of {outer!r}; skip {outer!r} instead")
            if self.enclosing[outer] is not None:
                self.reasons[name] = f"part of {outer!r}: {self.enclosing[outer]}"
            return
        block_type = block_type_for(module)
        if block_type is None:
            return
        owns = bool(getattr(block_type, "OWNS_SUBMODULES", False))
        if owns:
            self.enclosing[name] = None
        block = self._new_block(name, module, block_type)
        if block is None:
            if owns and name in self.reasons:
                self.enclosing[name] = self.reasons[name]
            return
        self._place(name, module, block)

    def _new_block(
        self, name: str, module: nn.Module, block_type: type[CurvatureBlock]
    ) -> CurvatureBlock | None:
        """The module's block, or None (with a reason where it is not obvious)."""
        if name in self.skip:
            self.reasons[name] = "listed in skip_modules"
            return None
        if not any(True for _ in module.parameters(recurse=False)):
            return None  # e.g. a norm layer without affine parameters: nothing to precondition
        try:
            block = block_type(module, name)
        except ValueError as err:  # a configuration the block refuses, e.g. a sparse embedding
            self.reasons[name] = str(err)
            return None
        params = block.parameters()
        if not all(isinstance(p, nn.Parameter) for p in params):
            # torch.nn.utils.parametrize: the weight is computed from other parameters on every
            # access and has no .grad; the block could never precondition the module.
            reason = "a parametrized weight (torch.nn.utils.parametrize), computed from other parameters"
            self.reasons[name] = reason
            for tensor_name in getattr(module, "parametrizations", {}):  # where the report looks up theirs
                self.reasons[".".join(filter(None, (name, "parametrizations", tensor_name)))] = reason
            block.remove()
            return None
        if not params or not all(p.requires_grad for p in params):
            self.reasons[name] = "parameters frozen (requires_grad=False)"
            block.remove()
            return None
        return block

    def _place(self, name: str, module: nn.Module, block: CurvatureBlock) -> None:
        """Add a block; if an earlier block has one of its parameters, tie the two, keep the
        enclosing one, or send both modules to the fallback."""
        params = block.parameters()
        owners = {self.owner[id(p)] for p in params if id(p) in self.owner}
        if not owners:
            self.blocks[name] = block
            self.owner.update({id(p): name for p in params})
            return
        other = owners.pop()
        first = self.blocks.get(other)
        if first is not None and not owners:
            if name.startswith(f"{other}.") and {id(p) for p in params} <= {
                id(p) for p in first.parameters()
            }:
                self.reasons[name] = f"handled by the block of {other!r}"  # e.g. an attention's out_proj
                block.remove()
                return
            shared = [p for p in params if id(p) in self.owner]
            if _can_tie(first, block, module, shared):
                tied = TiedBlock(first, block)
                del self.blocks[other]
                self.blocks[tied.name] = tied
                self.owner.update({id(p): tied.name for p in tied.parameters()})
                return
        # Sharing we cannot express: both modules use the plain update, not a wrong curvature.
        block.remove()
        if other in self.blocks:  # its modules (a tied block's each) fall back too; else they have
            dropped = self.blocks.pop(other)
            dropped.remove()
            for member in dropped.hooked():
                self.reasons[member.name] = f"parameter shared with {name!r} in a way K-FAC cannot handle"
        self.reasons[name] = f"parameter shared with {other!r} in a way K-FAC cannot handle"


def _can_tie(first: CurvatureBlock, block: CurvatureBlock, module: nn.Module, shared: list[Tensor]) -> bool:
    """Whether two blocks share exactly their weight and both support a tied block."""
    return (
        len(shared) == 1
        and shared[0] is getattr(module, "weight", None)
        and shared[0] is getattr(first.module, "weight", None)
        and supports_tying(first)
        and supports_tying(block)
    )


def iter_block_params(blocks: dict[str, CurvatureBlock]) -> Iterator[Tensor]:
    """Every parameter handled by a block."""
    for block in blocks.values():
        yield from block.parameters()


def report(model: nn.Module, blocks: dict[str, CurvatureBlock], fallback_reasons: dict[str, str]) -> str:
    """Registration report: every parameter, the block that handles it or why it falls back."""
    lines = ["K-FAC registration:"]
    owned = {id(p): block for block in blocks.values() for p in block.parameters()}
    # Parameters of a module with a block that the block leaves to the plain update.
    unhandled = {
        f"{name}.{local}" if name else local: why
        for name, block in blocks.items()
        for local, why in block.unhandled_parameters().items()
    }
    for pname, param in model.named_parameters():
        block = owned.get(id(param))
        if block is not None:
            lines.append(f"  {pname}: {type(block).__name__} ({block.extra_repr()})")
        else:
            reason = unhandled.get(pname) or fallback_reasons.get(
                pname.rpartition(".")[0], "no curvature block for this module type"
            )
            lines.append(f"  {pname}: fallback ({reason})")
    return "\n".join(lines)
