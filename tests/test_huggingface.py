"""The block of transformers' Conv1D is the Linear block of the transposed weight."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from torch_kfac import Arguments, KFACPreconditioner
from torch_kfac.blocks import block_type_for
from torch_kfac.huggingface import (
    Conv1DBlock,
    Logits,
    NextTokenLogits,
    logits_loss,
    next_token_loss,
    preconditioner_callback,
    register_transformers_blocks,
)

pytestmark = pytest.mark.usefixtures("float64")


def trainer_arguments(out: Path, **arguments: Any) -> Any:
    """The tests' `TrainingArguments`: on the CPU, no gradient clipping, the labels kept for
    `compute_loss_func`, no checkpoints, reports or progress bar, seed 3; `arguments` add or
    override."""
    from transformers import TrainingArguments

    common: dict[str, Any] = {
        "output_dir": str(out), "use_cpu": True, "max_grad_norm": 0.0, "label_names": ["labels"],
        "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "dataloader_num_workers": 0,
        "seed": 3,
    }  # fmt: skip
    return TrainingArguments(**{**common, **arguments})


def tiny_gpt2(layers: int = 1) -> Any:
    """A GPT-2 of 11 tokens, 8 positions and width 8, without dropout; the same weights at every
    call (seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=layers, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class Windows(torch.utils.data.Dataset):
    """Token windows as causal-LM examples: the labels are the ids (-100 marks padding), the inputs
    the ids with padding as token 0."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i].clamp(min=0), "labels": self.ids[i]}


def train_tiny_gpt2_preset(out: Path, layers: int = 1, resume: Path | None = None, **arguments: Any) -> Any:
    """`NextTokenLogits(tiny_gpt2(layers))` trained by the preset through the trainer (batches of
    4 of 16 seeded windows; `arguments`: more `TrainingArguments`); returns the model."""
    from transformers import Trainer, get_constant_schedule

    from torch_kfac import presets

    model, loss_fn = NextTokenLogits(tiny_gpt2(layers)), nn.CrossEntropyLoss()
    opt = presets.adaptive(model, loss_fn, reduction="mean_positions", mc_seed=3)
    Trainer(
        model=model,
        args=trainer_arguments(out, per_device_train_batch_size=4, **arguments),
        train_dataset=Windows(torch.randint(0, 11, (16, 8), generator=torch.Generator().manual_seed(0))),
        optimizers=(opt, get_constant_schedule(opt)),
        compute_loss_func=next_token_loss(loss_fn),
    ).train(resume_from_checkpoint=None if resume is None else str(resume))
    return model


def pair() -> tuple[nn.Sequential, nn.Sequential]:
    """A Conv1D network and the same network built from nn.Linear (weights transposed)."""
    linear = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    conv = nn.Sequential(Conv1D(4, 5), nn.Tanh(), Conv1D(3, 4))
    with torch.no_grad():
        for c, lin in ((conv[0], linear[0]), (conv[2], linear[2])):
            c.weight.copy_(lin.weight.T)
            c.bias.copy_(lin.bias)
    return conv, linear


def test_conv1d_block_equals_the_linear_block_of_the_transpose() -> None:
    """Same factors, and preconditioned gradients that are the transposes of the Linear ones."""
    register_transformers_blocks()
    conv, linear = pair()
    pres = [
        KFACPreconditioner(m, damping=1e-2, factor_update_steps=1, inverse_update_steps=1)
        for m in (conv, linear)
    ]
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = torch.randn(6, 2, 5, generator=gen), torch.randint(0, 3, (6, 2), generator=gen)
        for model, pre in zip((conv, linear), pres, strict=True):
            model.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            pre.step()
        for c, lin in ((conv[0], linear[0]), (conv[2], linear[2])):
            torch.testing.assert_close(c.weight.grad, lin.weight.grad.T, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(c.bias.grad, lin.bias.grad, rtol=1e-12, atol=1e-14)
    for name in ("0", "2"):
        conv_block, linear_block = pres[0].blocks[name], pres[1].blocks[name]
        assert isinstance(conv_block, Conv1DBlock)
        torch.testing.assert_close(conv_block.A, linear_block.A, rtol=1e-13, atol=0.0)
        torch.testing.assert_close(conv_block.G, linear_block.G, rtol=1e-13, atol=0.0)
    assert "0.weight: Conv1DBlock (A 6x6, G 4x4" in pres[0].describe()


def test_registration_gives_conv1d_its_block() -> None:
    register_transformers_blocks()
    assert block_type_for(Conv1D(4, 5)) is Conv1DBlock


def test_next_token_logits_and_loss_give_the_language_models_own_loss() -> None:
    """NextTokenLogits + next_token_loss(nn.CrossEntropyLoss()) is GPT-2's own shifted loss, padding
    (label -100, masked attention) included, and the logits are its logits shifted, vocabulary on dim 1."""
    lm = tiny_gpt2().double().eval()
    ids = torch.randint(0, 11, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model = NextTokenLogits(lm)
    logits = model(ids, attention_mask=mask)
    own = lm(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(logits, own.logits[:, :-1].transpose(1, 2), rtol=0, atol=0)
    loss = next_token_loss(nn.CrossEntropyLoss())(logits, labels, num_items_in_batch=None)
    torch.testing.assert_close(loss, own.loss.double(), rtol=1e-6, atol=0)  # its loss runs in float32


@pytest.mark.parametrize("lookup", ["shared", "per-example"])
def test_next_token_logits_passes_position_ids_on(lookup: str) -> None:
    """NextTokenLogits hands `position_ids` to the model (ids shifted by one give other logits). With
    GPT-2's default lookup, (1, T) shared by the batch, K-FAC warns that the position table's block
    sees the summed gradient; with ids of shape (N, T) it warns of nothing and gives the table a block."""
    lm = tiny_gpt2().double().eval()
    ids = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(2))
    model = NextTokenLogits(lm)
    positions = torch.arange(7).expand(3, 7)
    torch.testing.assert_close(model(ids, position_ids=positions), model(ids), rtol=0, atol=0)
    assert not torch.allclose(model(ids, position_ids=positions + 1), model(ids))
    pre = KFACPreconditioner(model, factor_update_steps=1)
    kwargs = {"position_ids": positions} if lookup == "per-example" else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.cross_entropy(model(ids, **kwargs), ids[:, 1:]).backward()
        pre.step()
    messages = [str(w.message) for w in caught if str(w.message).startswith("K-FAC")]
    shared = [m for m in messages if "'lm.transformer.wpe' was looked up" in m]
    assert len(shared) == (1 if lookup == "shared" else 0), messages
    assert pre.blocks["lm.transformer.wpe"].has_factors()


class Rows(torch.utils.data.Dataset):
    """Examples for the trainer as keyword inputs: {"inputs": x_i, "labels": y_i}."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.x[i], "labels": self.y[i]}


class Net(nn.Module):
    """The trainer calls model(inputs=...)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.body(inputs)


def test_the_preconditioner_callback_preconditions_each_of_the_trainers_steps(tmp_path: Path) -> None:
    """`Trainer` with SGD and `preconditioner_callback(pre)` (the MC Fisher, its batch taken from
    the trainer's pass) trains as the explicit loop on the batches the trainer drew."""
    from transformers import Trainer, get_constant_schedule

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=gen), torch.randint(0, 3, (64,), generator=gen)

    def build() -> tuple[Net, nn.Module, KFACPreconditioner, torch.optim.SGD]:
        model, loss_fn = Net(), nn.CrossEntropyLoss()
        pre = KFACPreconditioner(
            model, damping=1e-2, loss_fn=loss_fn, fisher_type="mc", mc_seed=5, warmup_steps=0
        )
        return model, loss_fn, pre, torch.optim.SGD(model.parameters(), lr=0.1)

    model, loss_fn, pre, sgd = build()
    batches: list[torch.Tensor] = []
    model.register_forward_hook(
        lambda m, args, kwargs, out: None if pre.own_pass() else batches.append(kwargs["inputs"]),
        with_kwargs=True,
    )
    Trainer(
        model=model,
        args=trainer_arguments(tmp_path, max_steps=4, per_device_train_batch_size=16),
        train_dataset=Rows(x, y),
        optimizers=(sgd, get_constant_schedule(sgd)),
        callbacks=[preconditioner_callback(pre)],
        compute_loss_func=lambda outputs, labels, num_items_in_batch=None: loss_fn(outputs, labels),
    ).train()  # fmt: skip
    assert pre.steps == 4 and len(batches) == 4

    expected, loss_fn, explicit, sgd = build()
    targets = {tuple(row.tolist()): label for row, label in zip(x, y, strict=True)}
    for inputs in batches:
        labels = torch.stack([targets[tuple(row.tolist())] for row in inputs])
        sgd.zero_grad()
        loss_fn(expected(inputs=inputs), labels).backward()
        explicit.step(batch=(Arguments(kwargs={"inputs": inputs}), labels))
        sgd.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected.parameters(), strict=True))


def test_next_token_loss_is_the_whole_batchs_loss_under_gradient_accumulation(tmp_path: Path) -> None:
    """The trainer sums its micro-batches' `compute_loss_func` losses and divides by nothing (it
    takes them as normalised by `num_items_in_batch`): two accumulated micro-batches of 8 must step
    as one batch of 16 does."""
    from transformers import Trainer, get_constant_schedule

    ids = torch.randint(0, 11, (32, 8), generator=torch.Generator().manual_seed(0))
    ids[3, 5:] = -100  # padding: the micro-batches hold different numbers of tokens

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (loss_fn's value, the trainer's loss)

    def train(batch_size: int, accumulate: int) -> list[torch.Tensor]:
        model = NextTokenLogits(tiny_gpt2())
        sgd = torch.optim.SGD(model.parameters(), lr=0.5)
        loss_fn, values = nn.CrossEntropyLoss(), []
        loss_fn.register_forward_hook(lambda m, args, out: values.append(out))
        compute = next_token_loss(loss_fn)

        def logged(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = compute(*args, **kwargs)
            pairs.append((values[-1], loss))
            return loss

        Trainer(
            model=model,
            args=trainer_arguments(
                tmp_path, max_steps=2, per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=accumulate,
            ),
            train_dataset=Windows(ids),
            optimizers=(sgd, get_constant_schedule(sgd)),
            compute_loss_func=logged,
        ).train()  # fmt: skip
        return [p.detach() for p in model.parameters()]

    accumulated = train(8, 2)
    assert all(not torch.equal(value, loss) for value, loss in pairs)  # each micro-batch: its share
    pairs.clear()
    for p, q in zip(accumulated, train(16, 1), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    # One pass per step: the trainer counts the tokens the loss counts (NextTokenLogits.loss_type),
    # so the loss K-FAC sees from loss_fn is the loss the trainer back-propagates, bit for bit.
    assert len(pairs) == 2 and all(torch.equal(value, loss) for value, loss in pairs)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_preset_fine_tunes_a_classifier_in_the_trainer_as_the_explicit_loop(
    tmp_path: Path, accumulate: int
) -> None:
    """`Logits(BertForSequenceClassification)` and `logits_loss`: the trainer's own
    `optimizer.step()` takes the batch and loss of its pass, so the preset's run equals the explicit
    loop on the batches the trainer drew, bit for bit; the accumulated loss is the batch's share.
    With `gradient_accumulation_steps=2` and `accumulated_passes='last'` the step takes the last
    micro-batch and its loss_fn value (each micro-batch back-propagated at its share, 1/2)."""
    from transformers import BertConfig, BertForSequenceClassification, Trainer, get_constant_schedule

    from torch_kfac import presets

    config = BertConfig(
        vocab_size=13, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=8, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 13, (24, 6), generator=gen), torch.randint(0, 3, (24,), generator=gen)

    class Sentences(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {
                "input_ids": ids[i],
                "attention_mask": torch.ones(6, dtype=torch.long),
                "labels": labels[i],
            }

    def build() -> tuple[Logits, nn.Module, Any]:
        torch.manual_seed(0)
        model, loss_fn = Logits(BertForSequenceClassification(config)), nn.CrossEntropyLoss()
        last = {"accumulated_passes": "last"} if accumulate > 1 else {}
        return model, loss_fn, presets.adaptive(model, loss_fn, mc_seed=7, **last)

    model, loss_fn, opt = build()
    batches: list[dict[str, torch.Tensor]] = []
    model.register_forward_hook(
        lambda m, args, kwargs, out: None if opt.preconditioner.own_pass() else batches.append(dict(kwargs)),
        with_kwargs=True,
    )
    Trainer(
        model=model,
        args=trainer_arguments(
            tmp_path, max_steps=3, per_device_train_batch_size=8 // accumulate,
            gradient_accumulation_steps=accumulate, remove_unused_columns=False,
        ),
        train_dataset=Sentences(),
        optimizers=(opt, get_constant_schedule(opt)),
        compute_loss_func=logits_loss(loss_fn),
    ).train()  # fmt: skip
    assert opt.preconditioner.steps == 3 and len(batches) == 3 * accumulate
    assert "num_items_in_batch" not in batches[0]

    expected, loss_fn, explicit = build()
    rows = {tuple(row.tolist()): label for row, label in zip(ids, labels, strict=True)}
    for i, kwargs in enumerate(batches):
        targets = torch.stack([rows[tuple(row.tolist())] for row in kwargs["input_ids"]])
        if i % accumulate == 0:
            explicit.zero_grad()
        loss = loss_fn(expected(**kwargs), targets)
        (loss / accumulate if accumulate > 1 else loss).backward()
        if i % accumulate == accumulate - 1:
            explicit.step(loss=loss, batch=(Arguments(kwargs=kwargs), targets))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected.parameters(), strict=True))

    logits = torch.randn(4, 3, generator=gen)
    targets = torch.tensor([0, 2, -100, 1])  # three labelled of the batch's 12
    share = logits_loss(loss_fn)(logits, targets, num_items_in_batch=torch.tensor(12))
    torch.testing.assert_close(share, loss_fn(logits, targets) * 3 / 12, rtol=1e-15, atol=0)


def test_the_trainer_saves_and_resumes_the_preset_on_a_tied_gpt2(tmp_path: Path) -> None:
    """The trainer saves a model that is not a `PreTrainedModel` with safetensors, which refused
    `NextTokenLogits`' tied head and token embedding; now a run resumed from its step-2 checkpoint
    (model and K-FAC state) ends where the uninterrupted run does, bit for bit."""
    saving = {"save_strategy": "steps", "save_steps": 2}
    uninterrupted = train_tiny_gpt2_preset(tmp_path / "whole", max_steps=4, **saving)
    train_tiny_gpt2_preset(tmp_path / "part", max_steps=2, **saving)
    resumed = train_tiny_gpt2_preset(
        tmp_path / "part", resume=tmp_path / "part" / "checkpoint-2", max_steps=4, **saving
    )
    assert all(
        torch.equal(p, q) for p, q in zip(resumed.parameters(), uninterrupted.parameters(), strict=True)
    )


def test_the_trainer_switches_gradient_checkpointing_on_through_the_wrapper(tmp_path: Path) -> None:
    """`TrainingArguments(gradient_checkpointing=True)` calls the model's
    `gradient_checkpointing_enable`, which the wrappers pass on (before: AttributeError); the
    recomputed (non-reentrant) passes leave the preset's run as it is without (to rounding)."""
    runs = {
        checkpointing: train_tiny_gpt2_preset(
            tmp_path, layers=2, max_steps=4, gradient_checkpointing=checkpointing
        )
        for checkpointing in (True, False)
    }
    assert runs[True].lm.is_gradient_checkpointing and not runs[False].lm.is_gradient_checkpointing
    for p, q in zip(runs[True].parameters(), runs[False].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)  # float64: the recomputation rounds apart


def test_batch_share_counts_the_targets_of_the_loss_modules_own_ignore_index() -> None:
    """A mean is weighted by its share of the batch's labelled targets, counted with the loss's
    own `ignore_index` (next-token labels from the second on); a sum, the whole batch's already,
    is left as it is; a loss module without `reduction` is taken as a mean."""
    gen = torch.Generator().manual_seed(0)
    logits, total = torch.randn(4, 3, generator=gen), torch.tensor(12)
    targets = torch.tensor([0, 2, -1, 1])  # three labelled targets of the batch's 12
    mean, summed = nn.CrossEntropyLoss(ignore_index=-1), nn.CrossEntropyLoss(ignore_index=-1, reduction="sum")
    torch.testing.assert_close(
        logits_loss(mean)(logits, targets, num_items_in_batch=total), mean(logits, targets) * 3 / 12
    )
    assert torch.equal(
        logits_loss(summed)(logits, targets, num_items_in_batch=total), summed(logits, targets)
    )

    class Plain(nn.Module):  # no `reduction` attribute
        def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(outputs, targets)

    full = torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(
        logits_loss(Plain())(logits, full, num_items_in_batch=total), Plain()(logits, full) / 3
    )
    sequence = torch.randn(2, 3, 4, generator=gen)  # (N, vocab, T - 1) next-token logits
    labels = torch.tensor([[5, 0, 1, -1, -1], [5, 2, 2, 1, 0]])  # the first label of each is dropped
    torch.testing.assert_close(
        next_token_loss(mean)(sequence, labels, num_items_in_batch=total),
        mean(sequence, labels[:, 1:]) * 6 / 12,
    )


def test_logits_without_inputs_names_remove_unused_columns() -> None:
    """A trainer that dropped every column (`remove_unused_columns`) calls the wrapper with nothing."""
    with pytest.raises(ValueError, match=r"remove_unused_columns=False"):
        Logits(nn.Linear(2, 2))()
