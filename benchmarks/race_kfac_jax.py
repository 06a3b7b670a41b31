"""kfac-jax's side of benchmarks/race.py: the autoencoder from exported PyTorch weights and batch indices.

Run by race.py in a subprocess (``python benchmarks/race_kfac_jax.py IN.npz OUT.json``), so that
XLA's thread flags are set before jax is imported and torch and XLA never share a process. The
input holds the training and evaluation images, the batch indices of every step, the initial
weights of each Linear layer (PyTorch layout) and the run's settings; the output is the curve of
(steps, seconds, eval loss), in race.py's format. The clock is the same as race.py's (process
CPU time or wall time); jit compilation runs on a throwaway copy before the clock starts.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import itertools
import json
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np

jax.config.update("jax_enable_x64", False)

#: kfac-jax's settings, those of its own autoencoder example: curvature from sampled labels every
#: step, inverses every 5 steps, damping adapted every 5 steps with decay 0.95.
SETTINGS: dict[str, Any] = {
    "l2_reg": 1e-5,
    "initial_damping": 0.1,
    "damping_adaptation_decay": 0.95,
    "damping_adaptation_interval": 5,
    "inverse_update_period": 5,
    "curvature_update_period": 1,
    "curvature_ema": 0.95,
    "num_burnin_steps": 10,
}


def forward(params: list[tuple[jax.Array, jax.Array]], x: jax.Array) -> jax.Array:
    """The tanh autoencoder; the last layer's outputs are pixel logits."""
    for i, (w, b) in enumerate(params):
        x = x @ w + b
        if i + 1 < len(params):
            x = jnp.tanh(x)
    return x


def pixel_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Sigmoid cross-entropy summed over pixels, mean over the batch (race.py's pixel_bce)."""
    per_pixel = jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return jnp.sum(per_pixel) / logits.shape[0]


def main(argv: list[str]) -> None:
    """Train under the budget and write the curve."""
    data = np.load(argv[0])
    cfg = json.loads(str(data["config"]))
    settings = {**SETTINGS, **cfg.get("kfac_jax", {})}
    l2_reg = settings.pop("l2_reg")
    x_train = jnp.asarray(data["x_train"])
    x_eval = jnp.asarray(data["x_eval"])
    indices = data["indices"]
    n_layers = int(data["n_layers"])
    params = [(jnp.asarray(data[f"w{i}"].T), jnp.asarray(data[f"b{i}"])) for i in range(n_layers)]

    def loss_fn(p: Any, batch: jax.Array) -> jax.Array:
        logits = forward(p, batch)
        kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch)
        reg = sum(jnp.sum(w**2) + jnp.sum(b**2) for w, b in p)
        return pixel_loss(logits, batch) + 0.5 * l2_reg * reg

    eval_loss = jax.jit(lambda p, xb: pixel_loss(forward(p, xb), xb) * xb.shape[0])

    def evaluate(p: Any) -> float:
        chunk = cfg["eval_chunk"]
        total = sum(float(eval_loss(p, x_eval[i : i + chunk])) for i in range(0, x_eval.shape[0], chunk))
        return total / x_eval.shape[0]

    def make_optimizer() -> kfac_jax.Optimizer:
        return kfac_jax.Optimizer(
            value_and_grad_func=jax.value_and_grad(loss_fn),
            l2_reg=l2_reg,
            use_adaptive_learning_rate=True,
            use_adaptive_momentum=True,
            use_adaptive_damping=True,
            multi_device=False,
            **settings,
        )

    clock = time.process_time if cfg["clock"] == "cpu" else time.perf_counter
    rng = jax.random.PRNGKey(cfg["seed"])

    def batch_at(step: int) -> jax.Array:
        return x_train[indices[step % len(indices)]]

    def first_step_batches() -> Any:
        """kfac-jax's burn-in (curvature only) on the first batches, then step 0's batch."""
        burn_in = (batch_at(s) for s in range(settings["num_burnin_steps"]))
        return itertools.chain(burn_in, [batch_at(0)])

    def step(p: Any, st: Any, key: jax.Array, s: int) -> Any:
        if s == 0:
            return opt.step(p, st, key, data_iterator=first_step_batches(), global_step_int=0)
        return opt.step(p, st, key, batch=batch_at(s), global_step_int=s)

    # Compile on a throwaway copy (jit compilation is not training time): kfac-jax compiles a
    # variant of its step for each combination of curvature, inverse and damping updates.
    t0 = clock()
    opt = make_optimizer()
    warm = jax.tree_util.tree_map(jnp.copy, params)
    warm_state = opt.init(warm, rng, batch_at(0))
    for s in range(2 * settings["inverse_update_period"] + 1):
        warm, warm_state, _ = step(warm, warm_state, rng, s)
    jax.block_until_ready(warm)
    evaluate(warm)
    compile_s = clock() - t0

    curve: list[dict[str, float]] = []
    initial = evaluate(params)
    curve.append({"steps": 0, "seconds": 0.0, "loss": initial})
    budget, interval = cfg["budget_s"], cfg["budget_s"] / cfg["evals"]
    train_s, steps, next_eval, diverged = 0.0, 0, interval, False
    t0 = clock()
    state = opt.init(params, rng, batch_at(0))
    jax.block_until_ready(state)
    train_s += clock() - t0
    while train_s < budget:
        rng, key = jax.random.split(rng)
        t0 = clock()
        params, state, stats = step(params, state, key, steps)
        batch_loss = float(stats["loss"])
        train_s += clock() - t0
        steps += 1
        if not math.isfinite(batch_loss):
            diverged = True
            break
        if train_s >= next_eval or train_s >= budget:
            curve.append({"steps": steps, "seconds": train_s, "loss": evaluate(params)})
            next_eval += interval
    result = {
        "optimizer": "kfac-jax",
        "hparams": {**settings, "l2_reg": l2_reg, "batch_size": int(indices.shape[1])},
        "steps": steps,
        "train_seconds": train_s,
        "compile_seconds": compile_s,
        "diverged": diverged,
        "versions": {"jax": jax.__version__, "kfac_jax": getattr(kfac_jax, "__version__", "?")},
        "curve": curve,
    }
    with open(argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
