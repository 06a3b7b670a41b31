"""The switched forward of blocks that re-run their module (here nn.MultiheadAttention's): calls
by keyword, and two preconditioners on one model, whose switches form a chain."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_kfac import KFACPreconditioner


class _Attend(nn.Module):
    """Causal self-attention, then a linear head on the mean over positions. `keywords`: the
    attention is called with its arguments by keyword, else by position."""

    def __init__(self, keywords: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True, dtype=torch.float64)
        self.head = nn.Linear(6, 3, dtype=torch.float64)
        self.keywords = keywords

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        if self.keywords:
            out, _ = self.attn(query=x, key=x, value=x, attn_mask=mask, need_weights=False)
        else:
            out, _ = self.attn(x, x, x, None, False, mask)
        return self.head(out.mean(1))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(5, 4, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)


def _factors(pre: KFACPreconditioner, model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training pass and a step of `pre`: the model's output and the attention block's state."""
    x, y = _data()
    out = model(x)
    F.cross_entropy(out, y).backward()
    pre.step()
    return out.detach(), {k: v.clone() for k, v in pre.blocks["attn"].state.items()}


def test_a_call_by_keyword_records_as_one_by_position() -> None:
    """The block takes the batch size and the masks from keyword arguments as from positional ones:
    the same output, batch size and factors."""
    runs = []
    for keywords in (False, True):
        model = _Attend(keywords)
        pre = KFACPreconditioner(model, factor_update_steps=1)
        runs.append((*_factors(pre, model), pre.blocks["attn"].batch_size))
    (out, state, n), (out_kw, state_kw, n_kw) = runs
    assert n == n_kw == 5
    torch.testing.assert_close(out_kw, out, rtol=0, atol=0)
    assert state.keys() == state_kw.keys() and state
    for key, value in state.items():
        torch.testing.assert_close(state_kw[key], value, rtol=0, atol=0)


def test_two_preconditioners_on_one_model_pass_calls_down_their_chain() -> None:
    """A second preconditioner on the same model puts its switch on top of the first's. Not
    recording (explicit mode, outside its contexts), it hands the call with all its arguments to
    the first's switch, which records: the first's factors and the model's output are those of a
    model with one preconditioner. Closing both gives the module its class's forward back."""
    alone = _Attend(keywords=True)
    out_alone, state_alone = _factors(KFACPreconditioner(alone, factor_update_steps=1), alone)
    model = _Attend(keywords=True)
    first = KFACPreconditioner(model, factor_update_steps=1)
    second = KFACPreconditioner(model, factor_update_steps=1)
    with second.track_backward():
        pass  # explicit mode: the second records only inside its contexts
    out, state = _factors(first, model)
    torch.testing.assert_close(out, out_alone, rtol=0, atol=0)
    assert state.keys() == state_alone.keys() and state
    for key, value in state.items():
        torch.testing.assert_close(value, state_alone[key], rtol=0, atol=0)
    assert not second.blocks["attn"].has_factors()
    second.close()
    first.close()
    assert "forward" not in model.attn.__dict__
