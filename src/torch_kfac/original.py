"""The original torch_kfac port's API on `KFAC`: its property names and its explicit tracking calls."""

from __future__ import annotations

from contextlib import AbstractContextManager

from torch import Tensor

from torch_kfac.blocks import CurvatureBlock
from torch_kfac.options import KFACOptions, check_option
from torch_kfac.preconditioner import KFACPreconditioner


class OriginalAPI:
    """`learning_rate`, `damping`, `covariances`, `track_forward()`/`track_backward()`,
    `update_cov()`, `reset_cov()`: the names the original port's code calls, mapped onto the
    parameter groups and the preconditioner."""

    preconditioner: KFACPreconditioner
    param_groups: list[dict]
    options: KFACOptions

    @property
    def blocks(self) -> dict[str, CurvatureBlock]:
        """Qualified module name -> curvature block (with `A`, `G`)."""
        return self.preconditioner.blocks

    @property
    def learning_rate(self) -> float:
        """Learning rate of the (first) parameter group; setting it sets every group's."""
        return self.param_groups[0]["lr"]

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        value = check_option("lr", value, label="learning_rate")
        if self.options.adaptive_learning_rate:
            raise ValueError(
                "learning_rate cannot be set with adaptive_learning_rate=True: the quadratic model "
                "chooses the learning rate at every step"
            )
        for group in self.param_groups:
            group["lr"] = value

    @property
    def damping(self) -> Tensor:
        """The current damping, a 0-d tensor."""
        return self.preconditioner.damping

    @damping.setter
    def damping(self, value: float | Tensor) -> None:
        self.preconditioner.damping = value

    @property
    def covariances(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Module name -> (A, G), the running Kronecker factors (e.g. to all-reduce them by hand)."""
        return {n: (b.A, b.G) for n, b in self.blocks.items() if _kronecker(b) and b.has_factors()}

    @covariances.setter
    def covariances(self, factors: dict[str, tuple[Tensor, Tensor]]) -> None:
        unknown = {n for n in factors if n not in self.blocks or not _kronecker(self.blocks[n])}
        if unknown:
            raise ValueError(f"covariances names modules without a Kronecker (A, G) block: {sorted(unknown)}")
        for name, (a, g) in factors.items():
            self.blocks[name].A, self.blocks[name].G = a, g
        self.preconditioner.update_inverses(force=True)

    def track_forward(self) -> AbstractContextManager[None]:
        """Record layer inputs only inside this context (as in the original API)."""
        return self.preconditioner.track_forward()

    def track_backward(self) -> AbstractContextManager[None]:
        """Record output gradients only inside this context (as in the original API)."""
        return self.preconditioner.track_backward()

    def update_cov(self) -> bool:
        """Fold the recorded statistics into the factors now; returns whether they changed."""
        return self.preconditioner.update_factors()

    def reset_cov(self) -> None:
        """Forget the factors and cached inverses."""
        self.preconditioner.reset_factors()

    def close(self) -> None:
        """Remove the hooks from the model."""
        self.preconditioner.close()


def _kronecker(block: CurvatureBlock) -> bool:
    """Whether a block has the two Kronecker factors A and G."""
    return "A" in block.FACTORS and "G" in block.FACTORS
