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
    skip = set(skip)
    blocks: dict[str, CurvatureBlock] = {}
    reasons: dict[str, str] = {}
    owner: dict[int, str] = {}
    unknown = skip - {name for name, _ in model.named_modules()}
    if unknown:
        raise ValueError(f"skip_modules names modules the model does not have: {sorted(unknown)}")
    #: Modules whose block type owns their submodules -> why they have no block (None: they have one).
    enclosing: dict[str, str | None] = {}
    for name, module in model.named_modules():
        outer = next((o for o in enclosing if name.startswith(f"{o}.") or (o == "" and name)), None)
        if outer is not None:
            # Part of the enclosing module's block (MultiheadAttention's out_proj, whose forward the
            # attention never calls: a block of its own would never see statistics).
            if name in skip:
                raise ValueError(f"skip_modules: {name!r} is part of {outer!r}; skip {outer!r} instead")
            if enclosing[outer] is not None:
                reasons[name] = f"part of {outer!r}: {enclosing[outer]}"
            continue
        block_type = block_type_for(module)
        if block_type is None:
            continue
        owns = bool(getattr(block_type, "OWNS_SUBMODULES", False))
        if owns:
            enclosing[name] = None
        if name in skip:
            reasons[name] = "listed in skip_modules"
            if owns:
                enclosing[name] = reasons[name]
            continue
        if not any(True for _ in module.parameters(recurse=False)):
            continue  # e.g. a norm layer without affine parameters: nothing to precondition
        try:
            block = block_type(module, name)
        except ValueError as err:  # a configuration the block refuses, e.g. a sparse embedding
            reasons[name] = str(err)
            if owns:
                enclosing[name] = reasons[name]
            continue
        params = block.parameters()
        if not params or not all(p.requires_grad for p in params):
            reasons[name] = "parameters frozen (requires_grad=False)"
            block.remove()
            if owns:
                enclosing[name] = reasons[name]
            continue
        owners = {owner[id(p)] for p in params if id(p) in owner}
        if not owners:
            blocks[name] = block
            owner.update({id(p): name for p in params})
            continue
        other = owners.pop()
        first = blocks.get(other)
        if (
            first is not None
            and not owners
            and name.startswith(f"{other}.")
            and {id(p) for p in params} <= {id(p) for p in first.parameters()}
        ):
            reasons[name] = f"handled by the block of {other!r}"  # e.g. an attention's out_proj
            block.remove()
            continue
        shared = [p for p in params if id(p) in owner]
        if (
            first is not None
            and not owners
            and len(shared) == 1
            and shared[0] is getattr(module, "weight", None)
            and shared[0] is getattr(first.module, "weight", None)
            and supports_tying(first)
            and supports_tying(block)
        ):
            tied = TiedBlock(first, block)
            del blocks[other]
            blocks[tied.name] = tied
            owner.update({id(p): tied.name for p in tied.parameters()})
            continue
        # Sharing we cannot express: both modules use the plain update, not a wrong curvature.
        block.remove()
        if other in blocks:
            blocks.pop(other).remove()
        reasons[other] = f"parameter shared with {name!r} in a way K-FAC cannot handle"
        reasons[name] = f"parameter shared with {other!r} in a way K-FAC cannot handle"
    return blocks, reasons


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
