"""The public PyTorch port of DeepFill v1, timed with its own trainer (not a test).

daa233/generative-inpainting-pytorch (https://github.com/daa233/generative-inpainting-pytorch)
is the PyTorch port DeepFill users reach for. This script imports its `Trainer` from a
checkout the user provides (`--port-dir`; nothing is copied from it into jattn) and times
the iteration its `train.py` runs when the generator is updated (`iteration % n_critic ==
0`): one generator forward pass, both WGAN critics on real and fake with the WGAN-GP
penalty, the critics' backward pass and Adam step, then the generator's losses, backward
pass and Adam step. Its own `configs/config.yaml` gives the losses, the optimizer and the
sizes (256x256 images, 128x128 holes jittered by up to 32: its critics' dense layers are
built for them); the script sets CPU and the batch size.

Note the port shares one generator forward pass between the critic and the generator
update, where the official TF code and jattn (`benchmarks/train_step.py`) run the
generator again for its own update on a fresh batch: per iteration the port does one
generator forward pass less.

Prints one JSON line: the port's commit, the setup, the median seconds per iteration after
one warm-up iteration, images/s and whether the losses are finite. Run it from a virtualenv
with torch, torchvision, numpy, pyyaml and pillow (the port's imports):

    git clone https://github.com/daa233/generative-inpainting-pytorch /tmp/gip
    taskset -c 0 /tmp/torchvenv/bin/python benchmarks/torch_port.py --port-dir /tmp/gip --threads 1
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time


def _commit(port_dir: pathlib.Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(port_dir), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _config(port_dir: pathlib.Path, batch: int) -> dict:
    import yaml

    config = yaml.safe_load((port_dir / "configs" / "config.yaml").read_text())
    config.update(cuda=False, gpu_ids=[], batch_size=batch)
    return config


def _torchvision() -> str:
    """torchvision's version, or "stand-in" where it cannot be imported (PyPI's torchvision
    wheels are CUDA builds, which fail to load beside a CPU-only torch). The port imports
    `torchvision.transforms` and `torchvision.utils` at module level but uses them only in
    its image-saving and debugging helpers, never in an iteration, so empty stand-in modules
    that fail when called let it run unchanged."""
    try:
        import torchvision
        return torchvision.__version__
    except (ImportError, OSError, RuntimeError):
        import types

        def unavailable(*args, **kwargs):
            raise RuntimeError("torchvision is not importable here")

        def attribute(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return unavailable

        for name in ("torchvision", "torchvision.transforms", "torchvision.utils"):
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__getattr__ = attribute
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision"].utils = sys.modules["torchvision.utils"]
        print("torch_port.py: torchvision does not import; its modules are stand-ins "
              "(the timed iteration does not use them)", file=sys.stderr, flush=True)
        return "stand-in"


def _iteration(trainer, config: dict, ground_truth):
    """`train.py`'s loop body for an iteration that updates the generator; returns the losses.

    `train.py` steps the critics' optimizer before the generator's backward pass, which
    still needs the critics' weights as they were: PyTorch since 1.5 refuses that ("one of
    the variables needed for gradient computation has been modified by an inplace
    operation"). So both backward passes run first, the generator's accumulating into the
    generator's parameters only (as `train.py` uses it: it zeroes the critics' gradients
    before their next update), then both Adam steps."""
    from utils.tools import mask_image, random_bbox

    bboxes = random_bbox(config, batch_size=ground_truth.size(0))
    x, mask = mask_image(ground_truth, bboxes, config)
    losses, _, _ = trainer(x, bboxes, mask, ground_truth, True)
    trainer.optimizer_d.zero_grad()
    trainer.optimizer_g.zero_grad()
    losses["d"] = losses["wgan_d"] + losses["wgan_gp"] * config["wgan_gp_lambda"]
    losses["g"] = (losses["l1"] * config["l1_loss_alpha"] + losses["ae"] * config["ae_loss_alpha"]
                   + losses["wgan_g"] * config["gan_loss_alpha"])
    losses["d"].backward()
    losses["g"].backward(inputs=list(trainer.netG.parameters()))
    trainer.optimizer_d.step()
    trainer.optimizer_g.step()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port-dir", required=True, help="a checkout of daa233/generative-inpainting-pytorch")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    port_dir = pathlib.Path(args.port_dir).resolve()
    if not (port_dir / "trainer.py").is_file() or not (port_dir / "configs" / "config.yaml").is_file():
        sys.exit(f"torch_port.py: {port_dir} is not a checkout of daa233/generative-inpainting-pytorch "
                 "(no trainer.py and configs/config.yaml)")
    sys.path.insert(0, str(port_dir))

    import numpy as np
    import torch

    torchvision = _torchvision()
    from trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    config = _config(port_dir, args.batch)
    trainer = Trainer(config)
    height, width, channels = config["image_shape"]
    ground_truth = torch.rand(args.batch, channels, height, width) * 2 - 1
    _iteration(trainer, config, ground_truth)  # warm-up
    times, finite = [], True
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        losses = _iteration(trainer, config, ground_truth)
        times.append(time.perf_counter() - t0)
        finite &= all(bool(torch.isfinite(v).all()) for v in losses.values())
    seconds = statistics.median(times)
    result = {"library": "daa233/generative-inpainting-pytorch", "commit": _commit(port_dir),
              "torch": torch.__version__, "torchvision": torchvision, "threads": torch.get_num_threads(), "batch": args.batch,
              "size": [height, width], "repeats": args.repeats, "seconds_per_iteration": seconds,
              "images_per_second": args.batch / seconds, "losses_finite": finite}
    print(json.dumps(result), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"results": [result]}, indent=2))


if __name__ == "__main__":
    main()
