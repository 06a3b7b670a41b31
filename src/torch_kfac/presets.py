"""Recommended configurations of `KFAC`, chosen by measurement on the benchmark workloads.

`adaptive(model, loss_fn)` is K-FAC without a number to choose: learning rate and momentum from
the exact quadratic model each step, Levenberg-Marquardt damping from an initial value calibrated
on the first batch (`damping='auto'`), curvature from labels sampled from the model (MC Fisher).
Train with ``opt.step(loss=loss, batch=(inputs, targets))``, or ``opt.step()`` after a training
pass ``loss_fn(model(inputs), targets)`` that calls this very `loss_fn` (which is how Lightning's
``opt.step(closure)`` runs it: `torch_kfac.last_batch`). The evidence for every value of
`ADAPTIVE` is in benchmarks/README.md ("The adaptive preset").
"""

from __future__ import annotations

from typing import Any

from torch import nn

from torch_kfac.optimizer import KFAC
from torch_kfac.options import FisherType

#: The adaptive preset's options (any of them can be overridden by a keyword of `adaptive`).
ADAPTIVE: dict[str, Any] = {
    "adaptive_learning_rate": True,
    "adaptive_momentum": True,
    "adapt_damping": True,
    "damping": "auto",
    "fisher_type": "mc",
    "damping_adaptation_decay": 0.95,
    "damping_adaptation_interval": 5,
    "min_damping": 1e-8,
    "factor_update_steps": 1,
    "inverse_update_steps": 5,
    # Inverses every step for the first 5 steps only (20 cost the autoencoder 4 s to its targets).
    "warmup_steps": 5,
    # The quadratic model's curvature on the batch's first 128 examples: against the whole batch
    # (256), the autoencoder and the convnet ended lower in each of two repeats and reached their
    # race targets sooner in three of four (race.py --kfac-grid); 64 left the LSTM of
    # tests/test_presets.py 16x above Adam (a step chosen on a quarter of its batch threw it from
    # 0.01 to 1.5), 128 keeps it at 0.0035x Adam's loss (benchmarks/README.md).
    "qmodel_batch_size": 128,
    # The adaptive momentum within [0, 1]: unbounded, it swings from -2.2 to 2.5 on the convnet
    # and a step with momentum above 1 threw the autoencoder from 224 to 340 (race.py).
    "momentum_bounds": (0.0, 1.0),
    # The MC Fisher's own pass on the batch's first 64 examples: the factors' moving average
    # smooths the extra noise, and the pass costs a quarter at batch 256 (race.py: autoencoder and
    # convnet reach lower held-out losses in the same time; benchmarks/README.md).
    "fisher_batch_size": 64,
}


def adaptive(model: nn.Module, loss_fn: nn.Module, **overrides: Any) -> KFAC:
    """A `KFAC` with the adaptive preset (`ADAPTIVE`) for `model` trained on `loss_fn`.

    `reduction` defaults to that of `loss_fn` ('mean' or 'sum'); pass `reduction='mean_positions'`
    for a loss averaged over sequence or spatial positions too (language models). Any other
    `KFAC` keyword overrides the preset's value; an override that switches a feature off drops the
    preset's option for it (`adaptive_momentum=False` its `momentum_bounds`,
    `fisher_type='empirical'` its `fisher_batch_size`) unless that option is given too.
    """
    if not isinstance(loss_fn, nn.Module):
        raise ValueError(f"loss_fn must be a loss module such as nn.CrossEntropyLoss(), got {loss_fn!r}")
    # Another reduction of the loss ('none', 'batchmean') is KFAC's loss check to report.
    reduction = getattr(loss_fn, "reduction", "mean")
    options = {**ADAPTIVE, "reduction": reduction if reduction in ("mean", "sum") else "mean", **overrides}
    if not options["adaptive_momentum"] and "momentum_bounds" not in overrides:
        del options["momentum_bounds"]  # they bound the adaptive momentum, which is switched off
    empirical = FisherType.parse("fisher_type", options["fisher_type"]) == FisherType.EMPIRICAL
    if empirical and "fisher_batch_size" not in overrides:
        del options["fisher_batch_size"]  # it sizes the MC Fisher's own pass, which is switched off
    return KFAC(model, loss_fn=loss_fn, **options)
