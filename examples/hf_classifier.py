"""Fine-tune a small BERT classifier with the Hugging Face `Trainer`: the adaptive preset, fixed
K-FAC, or the trainer's own AdamW, side by side.

The task needs no download: sequences of 16 tokens from a vocabulary of 20, each of three classes
favouring its own group of tokens (1-5, 6-10, 11-15; a token is drawn from the class's group with
probability 0.3, else from the whole vocabulary). The model is a randomly initialised two-layer
`BertForSequenceClassification`.

`Logits(model)` returns the classifier's logits as they are and `logits_loss(loss_fn)` is the
trainer's `compute_loss_func` (both from `torch_kfac.huggingface`), so the preset's step takes the
batch and loss of the trainer's own pass (`torch_kfac.last_batch`), inside the trainer's
`optimizer.step()`. `Logits` names no input column, hence `remove_unused_columns=False`.

    pip install "torch-kfac[hf]"
    python examples/hf_classifier.py --optimizer preset
    python examples/hf_classifier.py --optimizer adamw --lr 1e-3
    python examples/hf_classifier.py --optimizer kfac --lr 0.1
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from example_utils import add_common_arguments, pick_device, run
from hf_trainer import fit
from torch import Tensor, nn
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    get_constant_schedule,
)

from torch_kfac import KFAC, presets
from torch_kfac.huggingface import Logits, logits_loss

VOCAB, LENGTH, GROUPS = 20, 16, ((1, 6), (6, 11), (11, 16))


def token_groups(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """n sequences and their labels: each token is, with probability 0.3, one of its label's group
    of tokens, else any token."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(GROUPS), (n,), generator=gen)
    low = torch.tensor([g[0] for g in GROUPS])[labels, None]
    width = torch.tensor([g[1] - g[0] for g in GROUPS])[labels, None]
    in_group = low + (torch.rand(n, LENGTH, generator=gen) * width).long()
    anything = torch.randint(0, VOCAB, (n, LENGTH), generator=gen)
    return torch.where(torch.rand(n, LENGTH, generator=gen) < 0.3, in_group, anything), labels


class Sentences(Dataset):
    """Examples as the trainer passes them on: input ids, an attention mask and a label."""

    def __init__(self, ids: Tensor, labels: Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            # Per example, (N, T) once batched: BERT's default (1, T) is shared by the batch, and
            # K-FAC's block of the position table needs each sentence's own gradient.
            "position_ids": torch.arange(LENGTH),
            "labels": self.labels[i],
        }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, steps=150, batch_size=64)
    parser.add_argument("--optimizer", choices=["preset", "kfac", "adamw"], default="preset")
    parser.add_argument("--lr", type=float, default=None, help="kfac: 0.1, adamw: 1e-3 (the preset has none)")
    parser.add_argument("--train-size", type=int, default=4096)
    parser.add_argument("--test-size", type=int, default=1024)
    return parser.parse_args(argv)


@torch.no_grad()
def evaluate(model: nn.Module, ids: Tensor, labels: Tensor, device: torch.device) -> tuple[float, float]:
    """Held-out loss and accuracy."""
    model.eval()
    logits = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device)).float().cpu()
    model.train()
    return float(nn.functional.cross_entropy(logits, labels)), float(
        (logits.argmax(1) == labels).float().mean()
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fine-tune with `Trainer`; return the training losses, the held-out loss and accuracy, the time."""
    args = parse_args(argv)
    device = pick_device(args.device)
    train_ids, train_labels = token_groups(args.train_size, args.seed)
    test_ids, test_labels = token_groups(args.test_size, args.seed + 1)
    torch.manual_seed(args.seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=len(GROUPS),
    )
    model = Logits(BertForSequenceClassification(config))
    loss_fn = nn.CrossEntropyLoss()
    extra: dict[str, Any] = {}
    if args.optimizer == "preset":
        opt = presets.adaptive(model, loss_fn)
        extra["optimizers"] = (opt, get_constant_schedule(opt))  # the preset's step ignores it
    elif args.optimizer == "kfac":
        opt = KFAC(model, lr=args.lr or 0.1, damping=1e-2, momentum=0.9)
        extra["optimizers"] = (opt, get_constant_schedule(opt))
    training = {
        "learning_rate": args.lr or 1e-3,  # the trainer's AdamW (--optimizer adamw)
        "lr_scheduler_type": "constant",
        "remove_unused_columns": False,  # Logits.forward names no column
    }
    data = Sentences(train_ids, train_labels)
    losses, seconds = fit(
        args, device, model, data, training, compute_loss_func=logits_loss(loss_fn), **extra
    )
    test_loss, test_accuracy = evaluate(model, test_ids, test_labels, device)
    print(
        f"{args.optimizer}: {len(losses)} steps in {seconds:.1f}s, training loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}; held-out loss {test_loss:.3f}, accuracy {test_accuracy:.3f}"
    )
    return {"losses": losses, "test_loss": test_loss, "test_accuracy": test_accuracy, "seconds": seconds}


if __name__ == "__main__":
    run(main)
