"""Shared pieces of the benchmarks: models, losses, data, optimizers, timing and machine rates."""

from __future__ import annotations

import bisect
import contextlib
import importlib.util
import inspect
import json
import math
import os
import platform
import shlex
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_kfac import KFAC, presets

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

#: Layer widths of the Martens & Grosse (2015) MNIST autoencoder.
AUTOENCODER_DIMS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)

#: The defaults of every KFAC constructor argument (intervals, warm-up, ...), read from its signature.
KFAC_DEFAULTS = {k: v.default for k, v in inspect.signature(KFAC).parameters.items()}
Batch = tuple[Tensor, Tensor]
LossFn = Callable[..., Tensor]


# ----------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    """Wait for queued kernels on `device` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall clock that waits for the device before every reading."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        """Seconds (perf_counter) after the device has finished its queued work."""
        sync(self.device)
        return time.perf_counter()


def median(values: list[float]) -> float:
    """Median of a non-empty list (nan if empty)."""
    if not values:
        return math.nan
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


# ----------------------------------------------------------------------------------------- models
def autoencoder(dims: tuple[int, ...] = AUTOENCODER_DIMS) -> nn.Sequential:
    """Deep tanh autoencoder of Martens & Grosse (2015); outputs are logits of the pixels."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def convnet(
    channels: tuple[int, ...] = (16, 32, 64), hidden: int = 128, num_classes: int = 10
) -> nn.Sequential:
    """3x3 Conv2d+ReLU+MaxPool blocks on 28x28 images, then two Linear layers."""
    layers: list[nn.Module] = []
    c_in, side = 1, 28
    for c in channels:
        layers += [nn.Conv2d(c_in, c, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c_in, side = c, side // 2
    layers += [nn.Flatten(), nn.Linear(c_in * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm and a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(widths: tuple[int, ...] = (64, 128, 256, 512), num_classes: int = 10) -> nn.Sequential:
    """ResNet-18 for 32x32 images (He et al. 2016, CIFAR stem: a 3x3 convolution, no max-pool)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    c_in = widths[0]
    for i, width in enumerate(widths):
        layers += [BasicBlock(c_in, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)]
        c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention from two nn.Linear layers (K-FAC sees both)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """(N, T, width) -> (N, T, width)."""
        n, t, w = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, w))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: attention and a GELU MLP, each with a residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        """(N, T, width) -> (N, T, width)."""
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformerLM(nn.Module):
    """Small GPT-style language model built from nn.Embedding, nn.LayerNorm and nn.Linear."""

    def __init__(
        self, vocab: int = 64, width: int = 128, depth: int = 2, heads: int = 4, context: int = 64
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids (N, T) -> next-token logits (N, vocab, T), the layout of `nn.CrossEntropyLoss`."""
        # Position ids per example (N, T): a shared (T,) lookup gives K-FAC's block of the table
        # the batch's summed gradient, not per-example ones (and K-FAC warns about it).
        pos = torch.arange(idx.shape[1], device=idx.device).expand(idx.shape[0], -1)
        return self.head(self.ln_f(self.blocks(self.tok(idx) + self.pos(pos)))).transpose(1, 2)


# ----------------------------------------------------------------------------------------- losses
def pixel_bce(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Sigmoid cross-entropy summed over pixels; 'mean' averages over the batch, 'sum' does not."""
    total = F.binary_cross_entropy_with_logits(logits, target.flatten(1), reduction="sum")
    return total / target.shape[0] if reduction == "mean" else total


def class_ce(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of class labels."""
    return F.cross_entropy(logits, target, reduction=reduction)


def token_ce(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy of (N, vocab, T) logits; 'mean' averages over all tokens."""
    return F.cross_entropy(logits, target, reduction=reduction)


# ------------------------------------------------------------------------------------------- data
def load_examples_data() -> types.ModuleType:
    """The examples' dataset module (examples/data.py), imported under a private name."""
    path = REPO_ROOT / "examples" / "data.py"
    spec = importlib.util.spec_from_file_location("_kfac_examples_data", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def synthetic_images(n: int, seed: int = 0, classes: int = 10) -> tuple[Tensor, Tensor]:
    """Structured 28x28 images in [0, 1] (smooth low-rank patterns) and labels, for tests."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    basis = torch.randn(classes, 2, 28, 4, generator=gen)
    coef = torch.randn(n, 4, generator=gen) * 0.3 + 1.0
    rows = basis[labels, 0] * coef[:, None, :]
    images = torch.sigmoid(2.0 * rows @ basis[labels, 1].mT / 2.0)
    return images.unsqueeze(1), labels


def image_data(source: str, n_synthetic: int = 2048) -> tuple[Tensor, Tensor, str]:
    """Training images and labels: 'fashion-mnist' (local IDX files) or 'synthetic'; plus a description."""
    if source == "synthetic":
        x, y = synthetic_images(n_synthetic)
        return x, y, f"synthetic 28x28 images ({n_synthetic})"
    data = load_examples_data().load_fashion_mnist(FASHION_MNIST_DIR if source == "fashion-mnist" else source)
    return data.x_train, data.y_train, f"Fashion-MNIST train ({len(data.y_train)} images)"


@dataclass(frozen=True)
class MarkovCorpus:
    """Token stream from a random order-2 Markov chain and its entropy rate (the optimal loss)."""

    tokens: Tensor
    vocab: int
    entropy_rate: float


def markov_corpus(length: int = 400_000, vocab: int = 64, alpha: float = 0.1, seed: int = 0) -> MarkovCorpus:
    """Generate a synthetic 'text' from an order-2 Markov chain with Dirichlet(alpha) rows."""
    with seeded(seed):
        probs = torch.distributions.Dirichlet(
            torch.full((vocab * vocab, vocab), alpha, dtype=torch.float64)
        ).sample()
        uniforms = torch.rand(length, dtype=torch.float64).tolist()
    cdf = probs.cumsum(-1)
    cdf[:, -1] = 1.0
    cdf_rows = cdf.tolist()
    out = [0, 1]
    for u in uniforms[2:]:
        out.append(min(bisect.bisect_left(cdf_rows[out[-2] * vocab + out[-1]], u), vocab - 1))
    tokens = torch.tensor(out, dtype=torch.long)
    contexts = torch.bincount(tokens[:-2] * vocab + tokens[1:-1], minlength=vocab * vocab).double()
    row_entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
    entropy = float((contexts / contexts.sum() * row_entropy).sum())
    return MarkovCorpus(tokens=tokens, vocab=vocab, entropy_rate=entropy)


def lm_batch(corpus: Tensor, batch: int, context: int, gen: torch.Generator) -> Batch:
    """`batch` random windows of `context` tokens and their next tokens."""
    starts = torch.randint(0, corpus.numel() - context - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(context + 1)
    windows = corpus[idx]
    return windows[:, :-1], windows[:, 1:]


# ------------------------------------------------------------------------------------- optimizers
class Trainer:
    """One optimizer driving one model: `step(x, y)` runs zero_grad, forward, backward and the update."""

    name = "base"

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        self.model = model
        self.loss_fn = loss_fn

    def forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        """Zero the gradients, run forward and backward; returns the loss."""
        self.model.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        return loss

    def update(self, loss: Tensor) -> None:
        """Apply the update from the current gradients."""
        raise NotImplementedError

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One full training step; returns the (detached) loss."""
        loss = self.forward_backward(x, y)
        self.update(loss)
        return loss.detach()


class TorchTrainer(Trainer):
    """A `torch.optim.Optimizer` (Adam, SGD, torch_kfac.KFAC) in the usual loop."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, name: str
    ) -> None:
        super().__init__(model, loss_fn)
        self.optimizer = optimizer
        self.name = name
        self.wants_loss = isinstance(optimizer, KFAC) and bool(getattr(optimizer, "adapt_damping", False))

    def update(self, loss: Tensor) -> None:
        """optimizer.step(), passing the loss to K-FAC when it adapts damping."""
        if self.wants_loss:
            self.optimizer.step(loss=loss.detach())  # type: ignore[call-arg]
        else:
            self.optimizer.step()


class ApproxNGDTrainer(Trainer):
    """The original torch_kfac port on PyPI (`approxngd`): explicit tracking contexts, inverts every step."""

    name = "approxngd"

    def __init__(self, model: nn.Module, loss_fn: LossFn, lr: float, damping: float, momentum: float) -> None:
        super().__init__(model, loss_fn)
        import approxngd

        self.optimizer = approxngd.KFAC(model, lr, damping, momentum=momentum)

    def forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward and backward inside approxngd's tracking contexts."""
        self.model.zero_grad(set_to_none=True)
        with self.optimizer.track_forward():
            loss = self.loss_fn(self.model(x), y)
        with self.optimizer.track_backward():
            loss.backward()
        return loss

    def update(self, loss: Tensor) -> None:
        """Fold the covariances, invert, precondition and apply."""
        self.optimizer.step()


def _silence_asdl_nvtx() -> None:
    """ASDL 0.1a5 calls torch.cuda.nvtx.range unconditionally, which raises on a CPU build."""
    import asdl.precondition.natural_gradient as ng

    if not torch.cuda.is_available():
        ng.nvtx = types.SimpleNamespace(range=lambda *a, **k: contextlib.nullcontext())  # type: ignore[attr-defined]


class KaisaTrainer(Trainer):
    """KAISA (kfac-pytorch's `kfac.preconditioner.KFACPreconditioner`, when installed) in front of
    momentum SGD, with its defaults otherwise (eigendecompositions, kl_clip 1e-3)."""

    name = "kaisa"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        lr: float,
        damping: float,
        momentum: float,
        factor_update_steps: int,
        inverse_update_steps: int,
    ) -> None:
        super().__init__(model, loss_fn)
        from kfac.preconditioner import KFACPreconditioner  # kfac-pytorch

        self.preconditioner = KFACPreconditioner(
            model,
            factor_update_steps=factor_update_steps,
            inv_update_steps=inverse_update_steps,
            damping=damping,
            lr=lr,
        )
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def update(self, loss: Tensor) -> None:
        """Precondition the gradients, then the SGD step."""
        self.preconditioner.step()
        self.optimizer.step()


class ASDLTrainer(Trainer):
    """ASDL's KfacGradientMaker (empirical Fisher) in front of momentum SGD."""

    name = "asdl"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        lr: float,
        damping: float,
        momentum: float,
        data_size: int,
        factor_interval: int,
        inverse_interval: int,
        ema_decay: float,
    ) -> None:
        super().__init__(model, loss_fn)
        import asdl

        _silence_asdl_nvtx()
        config = asdl.PreconditioningConfig(
            data_size=data_size,
            damping=damping,
            preconditioner_upd_interval=inverse_interval,
            curvature_upd_interval=factor_interval,
            ema_decay=1.0 - ema_decay,
            ignore_modules=[nn.LayerNorm, nn.Embedding],
        )
        self.maker = asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp")
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        """ASDL's forward_and_backward: curvature, inverses and preconditioning included."""
        self.optimizer.zero_grad(set_to_none=True)
        dummy = self.maker.setup_model_call(self.model, x)
        self.maker.setup_loss_call(self.loss_fn, dummy, y)
        _, loss = self.maker.forward_and_backward()
        return loss

    def update(self, loss: Tensor) -> None:
        """Momentum SGD on the preconditioned gradients."""
        self.optimizer.step()


class PixelBCELoss(nn.BCEWithLogitsLoss):
    """BCEWithLogitsLoss summed over pixels and examples on flattened targets (reduction='sum')."""

    def __init__(self) -> None:
        super().__init__(reduction="sum")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Sum of the sigmoid cross-entropies."""
        return super().forward(logits, target.flatten(1))


#: Loss modules for K-FAC (its exact quadratic model, MC Fisher, token-level Fisher) and the
#: reduction to give KFAC for each: the token loss averages over batch and positions.
LOSS_MODULES: dict[Callable[..., Tensor], tuple[Callable[[], nn.Module], str]] = {
    pixel_bce: (PixelBCELoss, "sum"),
    class_ce: (nn.CrossEntropyLoss, "mean"),
    token_ce: (nn.CrossEntropyLoss, "mean_positions"),
}


class KFACLossModuleTrainer(Trainer):
    """KFAC given the loss module and the batch: MC Fisher, or adaptive lr/momentum/damping (qmodel)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, hparams: dict[str, Any], qmodel: bool) -> None:
        super().__init__(model, loss_fn)
        if loss_fn not in LOSS_MODULES:
            raise NotImplementedError("no torch loss module registered for this workload's loss")
        factory, reduction = LOSS_MODULES[loss_fn]
        self.module = factory()
        self.sums = reduction == "sum"
        self.name = "kfac-qmodel" if qmodel else "kfac"
        h = dict(hparams)
        if qmodel:
            h = {k: v for k, v in h.items() if k not in ("lr", "momentum")}
            h.update(adaptive_learning_rate=True, adaptive_momentum=True, adapt_damping=True)
        self.needs_loss = qmodel
        self.optimizer = KFAC(model, loss_fn=self.module, reduction=reduction, **h)
        self._batch: Batch | None = None

    def forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward and backward of the loss module; remembers the batch for the optimizer."""
        self.model.zero_grad(set_to_none=True)
        loss = self.module(self.model(x), y)
        loss.backward()
        self._batch = (x, y)
        return loss / x.shape[0] if self.sums else loss

    def update(self, loss: Tensor) -> None:
        """KFAC.step with the batch (and the loss, for the adaptive options)."""
        assert self._batch is not None
        scale = self._batch[0].shape[0] if self.sums else 1
        if self.needs_loss:
            self.optimizer.step(loss=loss.detach() * scale, batch=self._batch)
        else:
            self.optimizer.step(batch=self._batch)


class PresetTrainer(KFACLossModuleTrainer):
    """`torch_kfac.presets.adaptive` (the recommended configuration) with the workload's loss module."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, overrides: dict[str, Any]) -> None:
        Trainer.__init__(self, model, loss_fn)
        factory, reduction = LOSS_MODULES[loss_fn]
        self.module = factory()
        self.sums = reduction == "sum"
        self.name = "kfac-auto"
        self.needs_loss = True
        self.optimizer = presets.adaptive(model, self.module, reduction=reduction, **overrides)
        self._batch = None


def qmodel_options() -> dict[str, Any] | None:
    """Keyword arguments that turn on KFAC's adaptive learning rate and momentum, if it has them."""
    if "adaptive_learning_rate" in KFAC_DEFAULTS and "adaptive_momentum" in KFAC_DEFAULTS:
        return {"adaptive_learning_rate": True, "adaptive_momentum": True, "adapt_damping": True}
    return None


def make_trainer(kind: str, model: nn.Module, loss_fn: LossFn, hparams: dict[str, Any]) -> Trainer:
    """Build a trainer: 'adam', 'sgd', 'kfac', 'kfac-qmodel', 'kfac-auto', 'approxngd', 'kaisa' or 'asdl'."""
    h = dict(hparams)
    h.pop("batch_size", None)
    if kind == "adam":
        return TorchTrainer(model, loss_fn, torch.optim.Adam(model.parameters(), **h), kind)
    if kind == "sgd":
        h.setdefault("momentum", 0.9)
        return TorchTrainer(model, loss_fn, torch.optim.SGD(model.parameters(), **h), kind)
    if kind == "kfac":
        # The MC Fisher needs the loss module; a loss averaged over positions needs it for its scale.
        positions = LOSS_MODULES.get(loss_fn, (None, ""))[1] == "mean_positions"
        if h.get("fisher_type", "empirical") != "empirical" or positions:
            return KFACLossModuleTrainer(model, loss_fn, h, qmodel=False)
        return TorchTrainer(model, loss_fn, KFAC(model, **h), kind)
    if kind == "kfac-qmodel":
        if qmodel_options() is None:
            raise RuntimeError("this torch_kfac.KFAC has no adaptive learning rate/momentum")
        return KFACLossModuleTrainer(model, loss_fn, h, qmodel=True)
    if kind == "kfac-auto":
        return PresetTrainer(model, loss_fn, h)
    if kind == "approxngd":
        return ApproxNGDTrainer(model, loss_fn, h["lr"], h["damping"], h.get("momentum", 0.9))
    if kind == "kaisa":
        return KaisaTrainer(model, loss_fn, **h)
    if kind == "asdl":
        return ASDLTrainer(model, loss_fn, **h)
    raise ValueError(f"unknown optimizer kind {kind!r}")


# -------------------------------------------------------------------------------- machine rates
@dataclass
class MachineRates:
    """Rates measured on this machine in this run: the floors of every phase are computed from them."""

    matmul_flops: float
    """float32 GEMM rate (FLOP/s), best of several n x n x n products."""
    bandwidth: float
    """Memory bandwidth (bytes/s) of an out-of-place add on large tensors (2 reads, 1 write)."""
    cholesky_ref_n: int
    cholesky_inverse_s: float
    """Seconds for cholesky_ex + cholesky_inverse of an n x n SPD matrix (n = cholesky_ref_n)."""
    eigh_s: float
    """Seconds for torch.linalg.eigh of the same matrix."""

    def cholesky_inverse_time(self, n: int) -> float:
        """Floor for a damped inverse of an n x n factor: the measured reference time scaled by n^3."""
        return self.cholesky_inverse_s * (n / self.cholesky_ref_n) ** 3

    def eigh_time(self, n: int) -> float:
        """Floor for an eigendecomposition of an n x n factor, scaled by n^3."""
        return self.eigh_s * (n / self.cholesky_ref_n) ** 3

    @staticmethod
    def combine(samples: list[MachineRates], how: Callable[[list[float]], float]) -> MachineRates:
        """Combine repeated measurements field by field (e.g. the median of each)."""
        return MachineRates(
            matmul_flops=how([r.matmul_flops for r in samples]),
            bandwidth=how([r.bandwidth for r in samples]),
            cholesky_ref_n=samples[0].cholesky_ref_n,
            cholesky_inverse_s=how([r.cholesky_inverse_s for r in samples]),
            eigh_s=how([r.eigh_s for r in samples]),
        )


def best_rates(samples: list[MachineRates]) -> MachineRates:
    """The fastest rate and time seen for every field."""
    return MachineRates(
        matmul_flops=max(r.matmul_flops for r in samples),
        bandwidth=max(r.bandwidth for r in samples),
        cholesky_ref_n=samples[0].cholesky_ref_n,
        cholesky_inverse_s=min(r.cholesky_inverse_s for r in samples),
        eigh_s=min(r.eigh_s for r in samples),
    )


def _best_time(fn: Callable[[], Any], clock: Clock, reps: int) -> float:
    """Fastest of `reps` timed calls after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def measure_rates(
    device: torch.device, ref_n: int = 1024, reps: int = 3, numel: int = 16 * 2**20
) -> MachineRates:
    """Measure the GEMM rate, memory bandwidth, and Cholesky-inverse and eigh times on `device`."""
    matmul_n = ref_n
    clock = Clock(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(matmul_n, matmul_n, generator=gen).to(device)
    b = torch.randn(matmul_n, matmul_n, generator=gen).to(device)
    t_mm = _best_time(lambda: a @ b, clock, reps)
    u, v = torch.randn(numel, device=device), torch.randn(numel, device=device)
    w = torch.empty_like(u)
    t_bw = _best_time(lambda: torch.add(u, v, out=w), clock, reps)
    x = torch.randn(ref_n, 2 * ref_n, generator=gen).to(device)
    spd = x @ x.mT / (2 * ref_n) + 1e-2 * torch.eye(ref_n, device=device)

    def chol_inv() -> Tensor:
        chol, _ = torch.linalg.cholesky_ex(spd)
        return torch.cholesky_inverse(chol)

    t_chol = _best_time(chol_inv, clock, reps)
    t_eigh = _best_time(lambda: torch.linalg.eigh(spd), clock, reps)
    return MachineRates(
        matmul_flops=2 * matmul_n**3 / t_mm,
        bandwidth=3 * 4 * numel / t_bw,
        cholesky_ref_n=ref_n,
        cholesky_inverse_s=t_chol,
        eigh_s=t_eigh,
    )


# ---------------------------------------------------------------------------------- run metadata
def write_results(out: Path, name: str, result: dict[str, Any], report: str) -> None:
    """Write a benchmark's result to `out/<name>.json` and its markdown report to `out/<name>.md`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(report)


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that produced the results, as typed from the repository root."""
    path = Path(script).resolve()
    with contextlib.suppress(ValueError):
        path = path.relative_to(REPO_ROOT)
    return shlex.join(["python", str(path), *(sys.argv[1:] if argv is None else argv)])


def environment(device: torch.device) -> dict[str, Any]:
    """Machine and library facts recorded with every result file."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(env: dict[str, Any]) -> str:
    """One sentence describing the machine and its load, for the markdown reports."""
    load = ", ".join(f"{v:.2f}" for v in env["load_average_at_start"])
    end = env.get("load_average_at_end")
    load_end = f"; at the end {', '.join(f'{v:.2f}' for v in end)}" if end else ""
    return (
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']} "
        f"({env['torch_threads']} threads), device {env['device']}, flush denormals: "
        f"{env.get('flush_denormal', False)}; load average (1, 5, 15 min) at the start {load}{load_end}."
    )


def resolve_device(name: str) -> torch.device:
    """torch.device from a CLI string, failing clearly when CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build")
    return device


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block from a fixed torch seed."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
