"""Conditions for the forward-mode passes of the exact quadratic model (`qmodel.ExactCurvature`).

PyTorch's oneDNN (mkldnn) LSTM/GRU kernel on the CPU has no forward-mode derivative
("Trying to use forward AD with mkldnn_rnn_layer"), so for models with recurrent layers the
quadratic model's Jacobian-vector products run with oneDNN off (the native kernel has one).
Other models keep oneDNN, which the convolutions use.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch
from torch import nn


def forward_ad_context(model: nn.Module) -> AbstractContextManager[None]:
    """A context in which forward-mode AD works through every layer of `model`."""
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return torch.backends.mkldnn.flags(enabled=False)
    return contextlib.nullcontext()
