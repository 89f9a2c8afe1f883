"""Train the walk's step network on examples made by `Training.step_pairs`.

    python -m Training.train_stepper EXAMPLES_DIR [EXAMPLES_DIR ...] --out runs/stepper --steps 20000
    torchrun --nproc_per_node 8 -m Training.train_stepper ... --device cuda

CPU, one GPU, or many under torchrun (DistributedDataParallel, each rank draws its own
batches). A training state is written every ``--save-every`` steps; ``--resume`` goes on
from it. The release checkpoint (kind 'propagator', float16) is written at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from FewShotSegLib.checkpoints import load_training_state, save_checkpoint, save_training_state  # noqa: E402
from FewShotSegLib.errors import FewShotSegError  # noqa: E402
from FewShotSegLib.models import build_model  # noqa: E402
from FewShotSegLib.models.slicestep import PRESENT_PIXELS  # noqa: E402
from FewShotSegLib.preprocessing import PreprocessConfig  # noqa: E402
from Training.provenance import display_path, git_commit, hardware  # noqa: E402
from Training.example_store import ExampleStore, consolidate  # noqa: E402
from Training.train import _barrier, _device, _distributed  # noqa: E402


def augmented(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
    """The same flip / quarter turn for inputs and target; the two images' contrast and
    offset jittered together (scanners differ; the structure-relative scale stays)."""
    if torch.rand((), generator=generator) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    turns = int(torch.randint(0, 4, (), generator=generator))
    x, y = torch.rot90(x, turns, (-2, -1)), torch.rot90(y, turns, (-2, -1))
    n = x.shape[0]
    gain = torch.exp(torch.randn(n, 1, 1, 1, generator=generator) * 0.2)
    offset = torch.randn(n, 1, 1, 1, generator=generator) * 0.2
    x = torch.cat([x[:, :2] * gain + offset, x[:, 2:]], 1)
    return x, y


def step_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice (an empty target counts through the BCE)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return bce + dice.mean()


def _initial_weights(path: Path) -> tuple[dict, dict]:
    """The state dict and configuration of a step-network checkpoint (``--init``: a file
    or an installed model's name)."""
    from FewShotSegLib.checkpoints import load_checkpoint
    from FewShotSegLib.model_store import resolve_model_path
    loaded = load_checkpoint(resolve_model_path(path), expect_kind="propagator")
    net = getattr(loaded, "model", loaded)
    return {k: v.detach().float() for k, v in net.state_dict().items()}, dict(net.config)


def _load_widened(model, state: dict, path: Path) -> None:
    """``state`` into ``model``; an input layer with more channels than the checkpoint's
    gets zero weights for the new ones (the network starts as the checkpoint's)."""
    target = model.state_dict()
    for name, value in state.items():
        want = target.get(name)
        if want is None:
            raise FewShotSegError(f"{path}: weight {name} has no place in this network")
        if want.shape != value.shape:
            if value.dim() != 4 or want.shape[0] != value.shape[0] or want.shape[1] < value.shape[1] \
                    or want.shape[2:] != value.shape[2:]:
                raise FewShotSegError(f"{path}: weight {name} is {tuple(value.shape)}, this network's "
                                      f"{tuple(want.shape)}")
            value = torch.cat([value, value.new_zeros((want.shape[0], want.shape[1] - value.shape[1],
                                                       *want.shape[2:]))], 1)
        target[name] = value
    model.load_state_dict(target)


def _without_description(args: list) -> list:
    """The command line for the card; the description is the card's own text."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--description":
            skip = True
        elif not a.startswith("--description="):
            out.append(a)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the step network of the walks")
    parser.add_argument("examples", type=Path, nargs="+", help="folders of .npz from Training.step_pairs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--widths", default="16,32,48,64")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--init", default=None, metavar="CHECKPOINT",
                        help="start from a step network's weights (e.g. the shipped one) instead of at random; "
                             "a new input channel (--likelihood) starts at zero, so the start is that network")
    parser.add_argument("--likelihood", action="store_true",
                        help="a fifth input: the next slice's intensities under the previous mask's histogram")
    parser.add_argument("--presence", action="store_true",
                        help="train a presence output too (the structure goes on in the next slice: its own "
                             "loss, beside the mask's); with --init a network without one gains it")
    parser.add_argument("--oversample", action="append", default=[], metavar="GLOB=WEIGHT",
                        help="draw the examples of files matching GLOB WEIGHT times as often (repeatable)")
    parser.add_argument("--description", default="The walk's step network (mode 'learned').",
                        help="the model card's description (which data, what was held out)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = _device(args.device, 0)
    rank, world, local_rank, _ = _distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    oversample = {}
    for item in args.oversample:
        pattern, _, weight = item.partition("=")
        try:
            oversample[pattern] = float(weight)
        except ValueError:
            raise FewShotSegError(f"--oversample wants GLOB=WEIGHT, not {item!r}") from None
    start_weights = _initial_weights(args.init) if args.init else None   # a wrong file: before loading
    if rank == 0:                                      # the others wait, then map the same files
        for folder in args.examples:
            consolidate(folder, spare=args.out)
    if world > 1:
        _barrier(device)
    examples = ExampleStore(args.examples, oversample, spare=args.out)
    crop, files, weights = examples.crop, examples.files, examples.weights
    torch.manual_seed(args.seed)
    widths, likelihood, presence = [int(w) for w in args.widths.split(",")], args.likelihood, args.presence
    if start_weights is not None:   # the started network's shape; an input or output it had stays
        widths = list(start_weights[1]["widths"])
        likelihood = likelihood or bool(start_weights[1].get("likelihood", False))
        presence = presence or bool(start_weights[1].get("presence", False))
    model = build_model("slicestep", widths=widths, crop=crop, likelihood=likelihood, presence=presence)
    if start_weights is not None:
        _load_widened(model, start_weights[0], args.init)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    state_path, log_path = args.out / "training_state.pt", args.out / "log.jsonl"
    step, seconds = 0, 0.0
    if args.resume and state_path.exists():
        state = load_training_state(state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, seconds = int(state["step"]), float(state["seconds"])
        generator.manual_seed(args.seed * 1000 + rank + 7919 * step)   # fresh batches, on every rank
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"{len(examples)} examples from {len(files)} files, crop {crop}, "
              f"{sum(p.numel() for p in model.parameters())} weights, from step {step}", flush=True)
    running, start = [], time.perf_counter()
    while step < args.steps:
        index = (torch.multinomial(weights, args.batch, replacement=True, generator=generator) if oversample
                 else torch.randint(0, len(examples), (args.batch,), generator=generator))
        x, y = augmented(*examples.batch(index), generator)
        carried = x[:, 3:4].clamp(0.05, 0.95)
        out = net(x.to(device), with_presence=presence)
        correction, present_logit = out if presence else (out, None)
        loss = step_loss(torch.logit(carried.to(device)) + correction, y.to(device))
        if presence:
            present = ((y > 0.5).flatten(1).sum(1) >= PRESENT_PIXELS).float()
            loss = loss + F.binary_cross_entropy_with_logits(present_logit, present.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        running.append(float(loss.detach()))
        if rank == 0 and (step % args.save_every == 0 or step == args.steps):
            seconds += time.perf_counter() - start
            start = time.perf_counter()
            with open(log_path, "a") as log:
                log.write(json.dumps({"step": step, "loss": float(np.mean(running)), "seconds": round(seconds, 1)}) + "\n")
            running = []
            save_training_state(state_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                             "schedule": schedule.state_dict(),
                                             "step": step, "seconds": seconds})
            print(f"step {step}: loss {json.loads(log_path.read_text().splitlines()[-1])['loss']:.4f}", flush=True)
    if rank == 0:
        provenance = {"training": f"supervised walk steps (Training/step_pairs.py), batch {args.batch * world}, "
                                  f"AdamW lr {args.lr:g} cosine", "data": [display_path(f) for f in args.examples], "examples": len(examples), "example_files": len(files),
                      "batch": args.batch * world,
                      "oversample": oversample,
                      "init": display_path(Path(args.init)) if args.init else None,
                      "likelihood": likelihood, "presence": presence,
                      "steps": step, "wall_seconds": round(seconds, 1), "hardware": hardware(device, world),
                      "command": shlex.join(["python", "-m", "Training.train_stepper"] + _without_description(
                          list(argv or sys.argv[1:]))),
                      "code_version": git_commit(), "torch": str(torch.__version__)}
        save_checkpoint(args.out / "stepper.pt", model, kind="propagator", preprocess=PreprocessConfig(),
                        provenance=provenance, card={"description": args.description})
    if dist.is_initialized():
        # every rank waits for rank 0's checkpoint: a rank that tears the group down while
        # another still runs aborts the process (gloo: "terminate called ...")
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
        dist.destroy_process_group()
    return 0


def cli(argv=None) -> int:
    """``main`` with the engine's rule: a user error is one line and exit status 2."""
    try:
        return main(argv)
    except FewShotSegError as exc:
        print(f"train_stepper: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(cli())
