"""registration.py: which module gets which block, weight tying, and the report of who has none."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from torch_kfac import KFACPreconditioner
from torch_kfac.blocks import LinearBlock
from torch_kfac.blocks.tied import TiedBlock
from torch_kfac.registration import iter_block_params, make_blocks, report


class Tied(nn.Module):
    """An embedding whose weight the output projection shares."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.head = nn.Linear(5, 7)
        self.head.weight = self.embed.weight


def test_one_block_per_supported_module_and_reasons_for_the_rest() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 3), nn.Linear(3, 2))
    model[2].requires_grad_(False)
    blocks, reasons = make_blocks(model, ["3"])
    assert list(blocks) == ["0"] and isinstance(blocks["0"], LinearBlock)
    assert reasons == {"2": "parameters frozen (requires_grad=False)", "3": "listed in skip_modules"}
    assert list(iter_block_params(blocks)) == [model[0].weight, model[0].bias]
    text = report(model, blocks, reasons)
    assert "0.weight: LinearBlock" in text
    assert "1.weight: fallback (no curvature block for this module type)" in text
    assert "2.bias: fallback (parameters frozen" in text
    assert "3.weight: fallback (listed in skip_modules)" in text


def test_unknown_skipped_module_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"skip_modules names modules the model does not have: \['9'\]"):
        make_blocks(nn.Sequential(nn.Linear(2, 2)), ("9",))


def test_a_tied_weight_gets_one_tied_block() -> None:
    model = Tied()
    blocks, reasons = make_blocks(model, ())
    assert list(blocks) == ["embed+head"]
    assert isinstance(blocks["embed+head"], TiedBlock)
    assert {id(p) for p in iter_block_params(blocks)} == {id(p) for p in model.parameters()}
    assert not reasons


def test_sharing_without_a_kronecker_form_falls_back_for_both_modules() -> None:
    enc, dec = nn.Linear(4, 4), nn.Linear(4, 4)
    dec.bias = enc.bias
    blocks, reasons = make_blocks(nn.Sequential(enc, dec), ())
    assert blocks == {}
    assert "cannot handle" in reasons["0"] and "cannot handle" in reasons["1"]


def test_attention_owns_its_output_projection() -> None:
    model = nn.Sequential(nn.MultiheadAttention(4, 2, batch_first=True))
    blocks, _ = make_blocks(model, ())
    assert list(blocks) == ["0"]
    assert "0.out_proj" not in blocks
    with pytest.raises(ValueError, match="part of '0'"):
        make_blocks(model, ["0.out_proj"])
    assert len(list(iter_block_params(blocks))) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "parametrize", [parametrizations.weight_norm, parametrizations.spectral_norm, parametrizations.orthogonal]
)
def test_a_parametrized_weight_leaves_its_module_to_the_plain_update(parametrize: Callable) -> None:
    """torch.nn.utils.parametrize computes the weight on every access (no .grad of its own): the
    module gets no block (before, the report listed its bias under a LinearBlock whose statistics
    were recorded and inverted but never used), the report says why for its bias and the
    underlying parameters, and the bias keeps its plain gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(parametrize(nn.Linear(5, 5)), nn.Tanh(), nn.Linear(5, 3))
    blocks, reasons = make_blocks(model, ())
    assert list(blocks) == ["2"]
    assert reasons["0"].startswith("a parametrized weight (torch.nn.utils.parametrize)")
    text = report(model, blocks, reasons)
    for name, _ in model.named_parameters():
        if name.startswith("0."):
            assert f"{name}: fallback (a parametrized weight" in text, text
    for block in blocks.values():
        block.remove()
    pre = KFACPreconditioner(model, damping=1e-2, factor_update_steps=1, inverse_update_steps=1)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    for _ in range(3):  # the first step has no inverses yet: the later ones precondition
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grad = model[0].bias.grad.clone()
        pre.step()
        assert torch.equal(model[0].bias.grad, grad)
    assert pre.blocks["2"].has_inverses()


def test_the_report_names_why_an_enclosed_or_nested_module_falls_back() -> None:
    """A skipped attention's output projection is part of it (not 'no block for this type'); a
    nested skipped module's reason is found under its own name, not its parent's; a block's
    refusal (a sparse embedding) is quoted; and the attention's add_bias_kv parameters, which its
    block leaves to the plain update, say so, at the root of the model too."""
    inner = nn.Sequential(nn.Linear(4, 4), nn.Embedding(5, 4, sparse=True))
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(4, 2, batch_first=True), "outer": inner})
    blocks, reasons = make_blocks(model, ["attn", "outer.0"])
    assert blocks == {}
    text = report(model, blocks, reasons)
    assert "attn.out_proj.weight: fallback (part of 'attn': listed in skip_modules)" in text, text
    assert "outer.0.weight: fallback (listed in skip_modules)" in text, text
    assert "sparse" in reasons["outer.1"] and f"outer.1.weight: fallback ({reasons['outer.1']})" in text
    root = nn.MultiheadAttention(4, 2, add_bias_kv=True)
    blocks, reasons = make_blocks(root, ())
    assert list(blocks) == [""] and not reasons  # the root module's projection is its own
    text = report(root, blocks, reasons)
    assert "bias_k: fallback (add_bias_kv: appended to the keys/values" in text, text
    assert [line.split(":")[0].strip() for line in text.splitlines() if "fallback" in line] == [
        "bias_k",
        "bias_v",
    ]


def test_a_third_module_sharing_a_tied_weight_sends_every_sharer_to_the_fallback_with_the_reason() -> None:
    """Two Linear layers sharing a weight are tied; a third sharing it too cannot join: the report
    gives each module the reason (it said 'no curvature block for this module type' for the first
    two, whose reason was filed under the tied block's name '0+1'); a fourth finds no block left."""
    layers = [nn.Linear(4, 4) for _ in range(4)]
    for layer in layers[1:]:
        layer.weight = layers[0].weight
    model = nn.Sequential(*layers)
    blocks, reasons = make_blocks(model, ())
    assert blocks == {}
    assert reasons == {
        "0": "parameter shared with '2' in a way K-FAC cannot handle",
        "1": "parameter shared with '2' in a way K-FAC cannot handle",
        "2": "parameter shared with '0+1' in a way K-FAC cannot handle",
        "3": "parameter shared with '0+1' in a way K-FAC cannot handle",
    }
    text = report(model, blocks, reasons)
    names = ("0.weight", "0.bias", "1.bias", "2.bias", "3.bias")
    assert all(f"{name}: fallback (parameter shared with" in text for name in names), text


def test_a_bias_free_head_tied_to_an_embedding_gets_a_tied_block() -> None:
    """The head's only parameter is the embedding's weight: a tied block, not 'handled by' it."""
    model = Tied()
    model.head = nn.Linear(5, 7, bias=False)
    model.head.weight = model.embed.weight
    blocks, reasons = make_blocks(model, ())
    assert list(blocks) == ["embed+head"] and isinstance(blocks["embed+head"], TiedBlock)
    assert not reasons
