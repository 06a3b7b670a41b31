"""Curvature blocks for Hugging Face `transformers` layers (optional: transformers is imported lazily).

GPT-2 and its relatives build their attention and MLP projections from
`transformers.pytorch_utils.Conv1D`: a Linear layer whose weight is stored transposed, shape
(d_in, d_out), with y = x W + b. Its Fisher block is the Linear layer's A (x) G on the transpose;
`register_transformers_blocks()` gives every `Conv1D` that block. `nn.Linear`, `nn.Embedding`
and `nn.LayerNorm` (and an output head tied to the token embedding) have blocks already.

    from torch_kfac.huggingface import register_transformers_blocks
    register_transformers_blocks()  # before building KFAC / KFACPreconditioner

The adaptive preset in `Trainer` (which calls `optimizer.step()` without arguments; for a
classifier, `Logits(model)` and `logits_loss(loss_fn)` in the same places): the trainer
gets `NextTokenLogits(lm)`, whose output is the loss module's input as it is, and
`compute_loss_func=next_token_loss(loss_fn)` calls the preset's loss module on it, so the step
finds the batch and the loss of the trainer's pass (`torch_kfac.last_batch`):

    model = NextTokenLogits(GPT2LMHeadModel(config))
    loss_fn = nn.CrossEntropyLoss()
    opt = presets.adaptive(model, loss_fn, reduction="mean_positions")
    trainer = Trainer(
        model=model,
        args=TrainingArguments(..., max_grad_norm=0.0, label_names=["labels"]),
        optimizers=(opt, get_constant_schedule(opt)),
        compute_loss_func=next_token_loss(loss_fn),
    )

`KFACPreconditioner` in front of the trainer's own optimizer (AdamW and its schedule as they
are): `preconditioner_callback(pre)` runs `pre.step()` between the backward pass and each
optimizer step; with `fisher_type='mc'` the batch is that of the trainer's pass, as above.

    pre = KFACPreconditioner(model, loss_fn=loss_fn, fisher_type="mc", reduction="mean_positions")
    trainer = Trainer(..., callbacks=[preconditioner_callback(pre)], compute_loss_func=...)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from torch_kfac.blocks import LinearBlock, register_block
from torch_kfac.preconditioner import KFACPreconditioner


class Conv1DBlock(LinearBlock):
    """K-FAC block of `transformers`' `Conv1D`: `LinearBlock` with the weight read as W^T (d_out, d_in)."""

    def to_matrix(self, weight_like: Tensor, bias_like: Tensor | None) -> Tensor:
        """[W^T, b] as a (1, d_out, d_in [+1]) matrix from (d_in, d_out)- and (d_out,)-shaped tensors."""
        return super().to_matrix(weight_like.mT, bias_like)

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """The (d_in, d_out) weight part and the bias part of a (1, d_out, d_in [+1]) matrix."""
        d_in = self.weight.shape[0]
        return mat[0, :, :d_in].mT, mat[0, :, d_in] if self.bias is not None else None

    def extra_repr(self) -> str:
        """Factor shapes, for the registration report."""
        d_in, d_out = self.weight.shape
        d_in += self.bias is not None
        size = (d_in * d_in + d_out * d_out) * self.weight.element_size()
        return f"A {d_in}x{d_in}, G {d_out}x{d_out}, {size / 2**20:.2f} MiB per factor set"


def register_transformers_blocks() -> None:
    """Register `Conv1DBlock` for `transformers.pytorch_utils.Conv1D` (needs `transformers`)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "register_transformers_blocks needs the transformers package: pip install 'torch-kfac[hf]'"
        ) from err
    register_block(Conv1D, Conv1DBlock)


class _OutputWrapper(nn.Module):
    """A module around a Hugging Face model (`self.model`) that the Trainer can checkpoint, save
    and switch gradient checkpointing on."""

    model: nn.Module

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """The wrapped model's (`TrainingArguments(gradient_checkpointing=True)` calls it)."""
        self.model.gradient_checkpointing_enable(**kwargs)  # type: ignore[operator]

    def gradient_checkpointing_disable(self) -> None:
        """The wrapped model's."""
        self.model.gradient_checkpointing_disable()  # type: ignore[operator]

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's state, a weight shared by several names (GPT-2's output head and
        token embedding) copied for each name after the first: the Trainer saves a model that is
        not a `PreTrainedModel` with safetensors, which refuses tensors sharing memory. Loading
        writes the same values into the shared weight once per name."""
        state = super().state_dict(*args, **kwargs)
        seen: set[int] = set()
        for key, value in state.items():
            if isinstance(value, Tensor) and value.device.type != "meta":
                storage = value.untyped_storage().data_ptr()
                if storage in seen:
                    state[key] = value.detach().clone()
                seen.add(storage)
        return state


class NextTokenLogits(_OutputWrapper):
    """A causal language model's logits for each position's next token, (N, vocab, T - 1): the
    layout `nn.CrossEntropyLoss` takes over positions, whose targets are the labels from the second
    token on (`next_token_loss`)."""

    #: Tells the trainer that the loss shifts the labels, so its `num_items_in_batch` counts the
    #: labelled tokens from the second on, as `next_token_loss` does.
    loss_type = "ForCausalLM"

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    @property
    def model(self) -> nn.Module:  # type: ignore[override]
        """The language model (parameters named `lm.*`)."""
        return self.lm

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """Next-token logits, vocabulary on dim 1. `position_ids` of shape (N, T) give each sequence
        its own lookup of the position table (the model's default, (1, T), is shared by the batch,
        which K-FAC's block of that table cannot split into per-example gradients)."""
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        return logits[:, :-1].transpose(1, 2)


def next_token_loss(loss_fn: nn.Module) -> Callable[..., Tensor]:
    """`Trainer(compute_loss_func=...)` for `NextTokenLogits`: `loss_fn` on the logits and the labels
    from the second token on (the model's own loss: ignored positions labelled -100), weighted by
    the micro-batch's share of the batch (`batch_share`). (A trainer that counts the labels
    unshifted, unlike `NextTokenLogits.loss_type` asks, gives shares of about (T - 1) / T.)"""

    def compute_loss(outputs: Tensor, labels: Tensor, num_items_in_batch: Any = None) -> Tensor:
        targets = labels[:, 1:]
        return batch_share(loss_fn, loss_fn(outputs, targets), targets, num_items_in_batch)

    return compute_loss


class Logits(_OutputWrapper):
    """A Hugging Face model's `logits` alone (sequence classification: (N, classes)), the tensor a
    loss module takes as it is; the arguments go to the model unchanged (`logits_loss`). Its
    `forward(*args, **kwargs)` names no column, so the trainer needs
    `TrainingArguments(remove_unused_columns=False)` to pass the batch's columns on."""

    #: `num_items_in_batch` goes to `compute_loss_func`, not to the wrapped model.
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The model's `logits`."""
        if not args and not kwargs:
            raise ValueError(
                "Logits got no inputs: a Trainer drops the columns its model's forward does not name; "
                "pass TrainingArguments(remove_unused_columns=False)"
            )
        return self.model(*args, **kwargs).logits


def logits_loss(loss_fn: nn.Module) -> Callable[..., Tensor]:
    """`Trainer(compute_loss_func=...)` for `Logits`: `loss_fn` on the logits and the labels,
    weighted by the micro-batch's share of the batch (`batch_share`)."""

    def compute_loss(outputs: Tensor, labels: Tensor, num_items_in_batch: Any = None) -> Tensor:
        return batch_share(loss_fn, loss_fn(outputs, labels), labels, num_items_in_batch)

    return compute_loss


def batch_share(loss_fn: nn.Module, loss: Tensor, targets: Tensor, num_items_in_batch: Any) -> Tensor:
    """A micro-batch's `loss` as the trainer adds it up.

    The trainer sums the losses of its accumulated micro-batches (and of its devices) as they are:
    it takes them as divided by `num_items_in_batch`, the labelled targets of the whole batch. So a
    mean over a micro-batch's targets (reduction 'mean') is weighted by its share of them, and the
    step's loss and gradient are those of the whole batch; a sum needs nothing. A whole batch in
    one pass has a share of exactly 1: the loss is `loss_fn`'s, bit for bit. (With class weights
    the share is still counted in targets, as the trainer counts them.)
    """
    if num_items_in_batch is None or getattr(loss_fn, "reduction", "mean") != "mean":
        return loss
    counted = (targets != getattr(loss_fn, "ignore_index", -100)).sum()
    return loss * (counted / num_items_in_batch).to(loss.dtype)


def preconditioner_callback(pre: KFACPreconditioner) -> Any:
    """A `transformers.TrainerCallback` whose `on_pre_optimizer_step` runs `pre.step()`: the
    gradients the trainer's optimizer steps on are preconditioned. The trainer clips gradients
    before this event; turn its clipping off (`max_grad_norm=0.0`) to leave the step's size to the
    optimizer."""
    try:
        from transformers import TrainerCallback
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "preconditioner_callback needs the transformers package: pip install 'torch-kfac[hf]'"
        ) from err
    if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover - old transformers
        raise ImportError(
            "preconditioner_callback needs a transformers Trainer with the on_pre_optimizer_step event: "
            "this version would never call it; upgrade transformers"
        )

    class PreconditionGradients(TrainerCallback):  # type: ignore[misc]
        """Runs `KFACPreconditioner.step()` before each optimizer step."""

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            pre.step()

    return PreconditionGradients()
