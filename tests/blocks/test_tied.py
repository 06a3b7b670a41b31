"""A weight shared by two modules gets the sum of both uses' Kronecker terms, solved exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.reference import identity_preconditioned_loss
from torch_kfac import KFAC, KFACPreconditioner
from torch_kfac.blocks.tied import TiedBlock

pytestmark = pytest.mark.usefixtures("float64")


class TiedLinears(nn.Module):
    """x -> tanh(enc x) -> dec (with dec.weight = enc.weight, separate biases)."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec = nn.Linear(4, 4), nn.Linear(4, 4)
        if tie:
            self.dec.weight = self.enc.weight
        else:
            self.dec.weight = nn.Parameter(self.enc.weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.enc(x)))


class TinyLM(nn.Module):
    """Token embedding, a hidden layer, and an output projection tied to the embedding."""

    def __init__(self, vocab: int = 7, dim: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(ids)))).transpose(1, 2)


def lm_data() -> tuple[Tensor, Tensor]:
    """Token ids (N, T) and next-token targets."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (5, 6), generator=gen)
    return ids, torch.roll(ids, -1, dims=1)


def step(pre: KFACPreconditioner, model: nn.Module, loss: Tensor) -> None:
    """Backward and one preconditioner step."""
    model.zero_grad()
    loss.backward()
    pre.step()


def embed(inner: Tensor, cols: int, width: int, bias_col: int | None) -> Tensor:
    """A member's column factor placed in the [W | biases] column space."""
    full = torch.zeros(width, width)
    idx = list(range(cols)) + ([bias_col] if bias_col is not None else [])
    full[torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]] = inner
    return full


def test_tied_linears_member_factors_equal_the_untied_ones() -> None:
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    tied, free = TiedLinears(), TiedLinears(tie=False)
    pre_t, pre_f = KFACPreconditioner(tied), KFACPreconditioner(free)
    step(pre_t, tied, F.mse_loss(tied(x), y))
    step(pre_f, free, F.mse_loss(free(x), y))
    assert set(pre_t.blocks) == {"enc+dec"} and isinstance(pre_t.blocks["enc+dec"], TiedBlock)
    members = pre_t.blocks["enc+dec"].members
    for member, name in zip(members, ("enc", "dec"), strict=True):
        torch.testing.assert_close(member.A, pre_f.blocks[name].A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(member.G, pre_f.blocks[name].G, rtol=1e-12, atol=1e-14)
    assert "tied weight" in pre_t.describe() and "fallback" not in pre_t.describe()


def test_tied_linears_precondition_with_the_exact_two_term_solve() -> None:
    model = TiedLinears()
    damping = 1e-2
    pre = KFACPreconditioner(model, damping=damping, enable_pi_correction=False)
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    grad = torch.cat([model.enc.weight.grad, model.enc.bias.grad[:, None], model.dec.bias.grad[:, None]], 1)
    pre.step()
    block = pre.blocks["enc+dec"]
    root = (damping / 2) ** 0.5
    dense = sum(
        torch.kron(embed(m.A, 4, 6, bias) + root * torch.eye(6), m.G + root * torch.eye(4))
        for m, bias in zip(block.members, (4, 5), strict=True)
    )
    expected = torch.linalg.solve(dense, grad.T.reshape(-1)).reshape(6, 4).T
    torch.testing.assert_close(model.enc.weight.grad, expected[:, :4], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model.enc.bias.grad, expected[:, 4], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model.dec.bias.grad, expected[:, 5], rtol=1e-9, atol=1e-12)
    vec = torch.randn(4, 6)
    torch.testing.assert_close(
        block.curvature_product(vec).T.reshape(-1), block.dense_curvature() @ vec.T.reshape(-1)
    )


def test_tied_embedding_and_output_projection() -> None:
    model = TinyLM()
    ids, targets = lm_data()
    damping = 1e-1
    pre = KFACPreconditioner(model, damping=damping, enable_pi_correction=False)
    model.zero_grad()
    F.cross_entropy(model(ids), targets).backward()
    grad = torch.cat([model.embed.weight.grad, model.head.bias.grad[:, None]], 1)
    pre.step()
    block = pre.blocks["embed+head"]
    emb, head = block.members
    # The embedding's factors: token frequencies and output-gradient moments of its own use.
    counts = torch.bincount(ids.reshape(-1), minlength=7).double()
    torch.testing.assert_close(emb.A, counts / ids.numel())
    root = (damping / 2) ** 0.5
    dense = torch.kron(
        embed(emb.G, 3, 4, None) + root * torch.eye(4), torch.diag(emb.A) + root * torch.eye(7)
    )
    dense = dense + torch.kron(embed(head.A, 3, 4, 3) + root * torch.eye(4), head.G + root * torch.eye(7))
    expected = torch.linalg.solve(dense, grad.T.reshape(-1)).reshape(4, 7).T
    torch.testing.assert_close(model.embed.weight.grad, expected[:, :3], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model.head.bias.grad, expected[:, 3], rtol=1e-9, atol=1e-12)


def test_tied_language_model_trains_with_every_parameter_in_a_block() -> None:
    model = TinyLM()
    ids, targets = lm_data()
    opt = KFAC(model, 0.3, 1e-1, momentum=0.5, inverse_update_steps=2, norm_constraint=None)
    assert "fallback" not in opt.preconditioner.describe()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(model(ids), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    # The identity-preconditioned run ends higher (measured: K-FAC at 0.83 of it).
    plain = identity_preconditioned_loss(TinyLM(), lambda m: F.cross_entropy(m(ids), targets), 25, 0.3, 0.5)
    assert losses[-1] < 0.9 * plain, (losses[-1], plain)
    saved = opt.state_dict()
    fresh = TinyLM()
    fresh.load_state_dict(model.state_dict())
    other = KFAC(fresh, 0.3, 1e-1, momentum=0.5, inverse_update_steps=2, norm_constraint=None)
    other.load_state_dict(saved)
    torch.testing.assert_close(other.blocks["embed+head"].members[0].G, opt.blocks["embed+head"].members[0].G)


def test_tied_weight_refuses_power_half() -> None:
    with pytest.raises(ValueError, match="inverse_power"):
        KFACPreconditioner(TiedLinears(), inverse_method="eigh", inverse_power=-0.5)
