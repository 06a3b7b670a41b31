"""Data-parallel K-FAC on a small CNN under torchrun (gloo on CPUs, NCCL on GPUs).

    torchrun --standalone --nproc-per-node 4 examples/distributed.py --steps 200
    torchrun --standalone --nproc-per-node 4 --max-restarts 2 examples/distributed.py \\
        --checkpoint /tmp/kfac.pt --checkpoint-every 20

Every rank trains on its quarter of each global batch (synthetic 16x16 images of 10 classes, the
same for every world size); the model is wrapped in DistributedDataParallel, and K-FAC averages
its factors over ranks and spreads the inverses (`--grad-worker-fraction`, see
docs/distributed.md). With `--checkpoint`, the run saves every `--checkpoint-every` steps and
resumes from the last checkpoint when torchrun restarts the group after a lost rank;
`--kill-rank-at-step` kills rank 1 there in the first attempt, to watch that happen.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from torch_kfac import KFAC

CLASSES = 10


def make_model() -> nn.Module:
    """A small CNN: two convolutions, two linear layers."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, CLASSES),
    )


def global_batch(step: int, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s batch: a fixed template per class plus noise (the same on every rank)."""
    templates = torch.randn(CLASSES, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1 + step)
    labels = torch.randint(0, CLASSES, (size,), generator=gen)
    images = templates[labels] + torch.randn(size, 1, 16, 16, generator=gen)
    return images.to(dtype), labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (split over ranks)")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--damping", type=float, default=3e-2)
    parser.add_argument("--grad-worker-fraction", type=float, default=1.0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--checkpoint", type=Path, help="save here, and resume from here if it exists")
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--kill-rank-at-step", type=int, help="SIGKILL rank 1 at this step (first attempt)")
    parser.add_argument("--final", type=Path, help="save the final parameters here")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    # Keys of this attempt only: after a restart, gloo could otherwise read a dead rank's address
    # that the previous attempt left in torchrun's store.
    store, rank, world = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt_{attempt}", store)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} ranks")
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    model = make_model().to(device=device, dtype=dtype)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(ddp, lr=args.lr, damping=args.damping, grad_worker_fraction=args.grad_worker_fraction)

    start = 0
    if args.checkpoint is not None and args.checkpoint.exists():
        saved = torch.load(args.checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        start = saved["step"]
    if rank == 0 and args.checkpoint is not None:
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        with open(args.checkpoint.parent / "attempts.log", "a") as log:
            log.write(f"attempt {attempt}: {'restart' if attempt else 'start'} at step {start}\n")

    local = args.batch_size // world
    for step in range(start, args.steps):
        if args.kill_rank_at_step == step and attempt == 0 and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a lost rank: torchrun restarts the group
        images, labels = global_batch(step, args.batch_size, dtype)
        images = images[rank * local : (rank + 1) * local].to(device)
        labels = labels[rank * local : (rank + 1) * local].to(device)
        opt.zero_grad()
        loss = loss_fn(ddp(images), labels)
        loss.backward()
        global_loss = opt.step(loss=loss)  # the loss averaged over ranks
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {float(global_loss):.4f}", flush=True)
        if args.checkpoint is not None and (step + 1) % args.checkpoint_every == 0:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}  # every rank
            if rank == 0:
                torch.save(state, args.checkpoint.with_suffix(".tmp"))
                os.replace(args.checkpoint.with_suffix(".tmp"), args.checkpoint)
            dist.barrier()
    if rank == 0 and args.final is not None:
        args.final.parent.mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach().cpu() for n, p in model.named_parameters()}, args.final)
    # Every rank reaches the end before any tears the group down: destroying it while another rank
    # still works (here rank 0 saving) is reported to hang now and then (pytorch/pytorch#75097).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
