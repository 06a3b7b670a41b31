"""A PyTorch Lightning `LightningModule` whose optimizer is `torch_kfac.KFAC`.

`KFAC` is a `torch.optim.Optimizer`, so Lightning's automatic optimization drives it: the
trainer calls `optimizer.step(closure)`, the closure runs `training_step` and the backward pass
(during which K-FAC's hooks record the layer statistics), and K-FAC then takes its step. The
learning-rate scheduler is returned from `configure_optimizers` as for any optimizer.
Validation runs without gradients, so it never enters K-FAC's statistics.

With `--preset`, the optimizer is `presets.adaptive(self, self.loss_fn)`: no learning rate, no
schedule. Its step needs the batch and the loss, which it takes from the closure's training pass
(`self.loss_fn` on the module's outputs), so `training_step` is the same in both modes.

    pip install lightning
    python examples/lightning_kfac.py                        # Fashion-MNIST, small CNN
    python examples/lightning_kfac.py --synthetic --steps 50  # no dataset needed
    python examples/lightning_kfac.py --preset               # the adaptive preset
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from data import DEFAULT_DATA_DIRS, load_fashion_mnist
from example_utils import add_common_arguments, add_image_arguments, image_split, run
from models import small_cnn
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from torch_kfac import KFAC, presets


class KFACClassifier(L.LightningModule):
    """An image classifier trained by K-FAC with a cosine learning-rate schedule."""

    def __init__(
        self, lr: float = 0.1, damping: float = 1e-2, norm_constraint: float = 1e-3, preset: bool = False
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = small_cnn(image_size=28, channels=(16, 32), hidden=64)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.train_losses: list[float] = []
        self.val_accuracy: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Mean cross-entropy of one batch (K-FAC's default `reduction='mean'`)."""
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        self.train_losses.append(loss.item())
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accuracy on a validation batch."""
        x, y = batch
        acc = (self(x).argmax(1) == y).float().mean()
        self.log("val_acc", acc, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        """Keep the epoch's validation accuracy."""
        acc = self.trainer.callback_metrics.get("val_acc")
        if acc is not None:
            self.val_accuracy.append(float(acc))

    def configure_optimizers(self) -> dict[str, Any]:
        """K-FAC over the whole module, with a cosine schedule stepped every batch (or the preset)."""
        hp = self.hparams
        if hp.preset:
            return {"optimizer": presets.adaptive(self, self.loss_fn)}
        opt = KFAC(self, lr=hp.lr, damping=hp.damping, momentum=0.9, norm_constraint=hp.norm_constraint)
        max_steps = max(self.trainer.max_steps, 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, steps=500, batch_size=128)
    add_image_arguments(parser, DEFAULT_DATA_DIRS["fashion-mnist"], "Fashion-MNIST folder")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--norm-constraint", type=float, default=1e-3, help="bound on lr^2 g^T F^-1 g")
    parser.add_argument("--val-every", type=int, default=100, help="validate every this many steps")
    parser.add_argument("--preset", action="store_true", help="presets.adaptive (--lr, --damping unused)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit with a Lightning `Trainer`, return the training losses and validation accuracies."""
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    x_train, y_train, x_test, y_test = image_split(args, load_fashion_mnist, 1, 28)
    train, val = TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=gen)
    val_loader = DataLoader(val, batch_size=1000)

    accelerator = "auto" if args.device == "auto" else torch.device(args.device).type
    module = KFACClassifier(args.lr, args.damping, args.norm_constraint, args.preset)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator=accelerator,
        devices=1,
        val_check_interval=min(args.val_every, args.steps, len(train_loader)),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_progress_bar=not args.no_progress,  # Lightning's own tqdm bar
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    seconds = time.perf_counter() - start
    losses, acc = module.train_losses, module.val_accuracy
    print(
        f"{trainer.global_step} steps in {seconds:.1f}s: loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
        f"validation accuracy {acc[-1] if acc else float('nan'):.4f}"
    )
    return {"losses": losses, "val_accuracy": acc, "steps": trainer.global_step, "seconds": seconds}


if __name__ == "__main__":
    run(main)
