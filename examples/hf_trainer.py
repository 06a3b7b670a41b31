"""Train a small GPT-2 with the Hugging Face `Trainer`, K-FAC as its optimizer, in bfloat16.

`KFAC` is a `torch.optim.Optimizer`, so it goes into `Trainer(optimizers=(optimizer, scheduler))`
like any other; the trainer's backward pass feeds K-FAC's hooks and its `optimizer.step()` takes
the K-FAC step. The model is a randomly initialised GPT-2 (`GPT2Config`, no download) trained on
generated text, a character per token. `register_transformers_blocks()` gives GPT-2's `Conv1D`
projections a curvature block; the embeddings, the LayerNorms and the output head (tied to the
token embedding) have theirs already. The trainer's gradient clipping is off: K-FAC's norm
constraint bounds the step instead.

With `--preset`, the optimizer is `presets.adaptive` (no learning rate, no schedule). Its step
needs the loss module and the batch: the trainer gets `NextTokenLogits(model)`, whose output is
what `nn.CrossEntropyLoss` takes, and `compute_loss_func=next_token_loss(loss_fn)` calls that loss
module on it (both from `torch_kfac.huggingface`), so the trainer's own `optimizer.step()` finds
the batch and the loss of its training pass (`torch_kfac.last_batch`).

    pip install "torch-kfac[hf]"
    python examples/hf_trainer.py               # bf16 autocast on the CPU (or on CUDA with --device cuda)
    python examples/hf_trainer.py --no-bf16 --steps 500
    python examples/hf_trainer.py --preset
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from char_transformer import generate_text
from example_utils import add_common_arguments, pick_device, run
from torch import Tensor, nn
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_constant_schedule,
    get_cosine_schedule_with_warmup,
)
from transformers.pytorch_utils import Conv1D

from torch_kfac import KFAC, presets
from torch_kfac.huggingface import NextTokenLogits, next_token_loss, register_transformers_blocks

#: Module types whose parameters should all have a curvature block (or a stated reason not to).
CURVATURE_TYPES = (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.LayerNorm)


class CharWindows(Dataset):
    """Random windows of `context` characters of a text, as causal-LM examples (labels = inputs)."""

    def __init__(self, ids: Tensor, context: int, size: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(ids) - context, (size,), generator=gen)
        self.ids, self.context = ids, context

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        window = self.ids[self.starts[i] : self.starts[i] + self.context]
        # Position ids per example, (N, T) once batched: GPT-2's default (1, T) is shared by the
        # batch, and K-FAC's block of the position table needs each sequence's own gradient.
        return {"input_ids": window, "position_ids": torch.arange(self.context), "labels": window}


class LossLog(TrainerCallback):
    """Keeps the training loss the trainer logs at every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **_: Any
    ) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def fit(
    args: argparse.Namespace,
    device: torch.device,
    model: nn.Module,
    data: Dataset,
    training: dict[str, Any],
    **trainer: Any,
) -> tuple[list[float], float]:
    """Train `model` on `data` with `Trainer` for `--steps` steps of `--batch-size`, logging every
    step's loss: (the losses, the seconds). `training`: more `TrainingArguments`; `trainer`: more
    `Trainer` arguments (optimizers, compute_loss_func). Gradient clipping is off (K-FAC bounds the
    step with its norm constraint) and the labels stay for `compute_loss_func`."""
    log = LossLog()
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            use_cpu=device.type == "cpu",
            max_grad_norm=0.0,
            label_names=["labels"],
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=args.no_progress,
            seed=args.seed,
            dataloader_num_workers=0,
            **training,
        )
        job = Trainer(model=model, args=arguments, train_dataset=data, callbacks=[log], **trainer)
        start = time.perf_counter()
        job.train()
        return log.losses, time.perf_counter() - start


def coverage(opt: KFAC, model: torch.nn.Module) -> dict[str, str]:
    """Each parameter of a Linear/Conv1D/Embedding/LayerNorm -> its line of the registration report."""
    report = dict(line.strip().split(": ", 1) for line in opt.preconditioner.describe().splitlines()[1:])
    return {
        f"{name}.{pname}" if name else pname: report[f"{name}.{pname}" if name else pname]
        for name, module in model.named_modules()
        if isinstance(module, CURVATURE_TYPES)
        for pname, _ in module.named_parameters(recurse=False)
        if (f"{name}.{pname}" if name else pname) in report  # a tied weight is listed under its first name
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, steps=200, batch_size=32)
    parser.add_argument("--context", type=int, default=32, help="characters per sequence")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--norm-constraint", type=float, default=1e-3, help="bound on lr^2 g^T F^-1 g")
    parser.add_argument("--warmup", type=int, default=10, help="learning-rate warm-up steps")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32")
    parser.add_argument("--preset", action="store_true", help="presets.adaptive (--lr etc. unused)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train with `Trainer`; return the losses, the block coverage and the time."""
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    text = generate_text(2000, args.seed)
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    data = CharWindows(ids, args.context, args.steps * args.batch_size, args.seed)

    config = GPT2Config(
        vocab_size=len(chars),
        n_positions=args.context,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    register_transformers_blocks()
    extra: dict[str, Any] = {}
    if args.preset:
        # The loss is the mean over every sequence's positions (reduction='mean_positions').
        loss_fn = nn.CrossEntropyLoss()
        model = NextTokenLogits(model)
        opt = presets.adaptive(model, loss_fn, reduction="mean_positions")
        scheduler = get_constant_schedule(opt)  # the trainer attaches one; the preset's step ignores it
        extra["compute_loss_func"] = next_token_loss(loss_fn)
    else:
        # GPT-2's loss is the mean over the batch's tokens: K-FAC's default reduction='mean' (the
        # Fisher of each sequence's token-averaged loss).
        opt = KFAC(
            model, lr=args.lr, damping=args.damping, momentum=0.9, norm_constraint=args.norm_constraint
        )
        scheduler = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    # GPT-2's labels are its inputs; bf16 autocast on the CPU unless --no-bf16.
    losses, seconds = fit(
        args, device, model, data, {"bf16": not args.no_bf16}, optimizers=(opt, scheduler), **extra
    )
    print(
        f"{len(losses)} steps in {seconds:.1f}s ({'float32' if args.no_bf16 else 'bf16 autocast'}): "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} nats/char (uniform: {math.log(len(chars)):.3f})"
    )
    return {"losses": losses, "coverage": coverage(opt, model), "seconds": seconds, "vocab": len(chars)}


if __name__ == "__main__":
    run(main)
