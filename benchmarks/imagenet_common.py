"""What the ImageNet-size benchmarks share: the seeded networks, their data, and one run per process.

The scale benchmarks (``mip_scale.py``, ``reconstruct_scale.py``, ``warm_start_memory.py``) each
measure one stage of a compile of a seeded :mod:`oamipc.models` network on random 224x224 images
labelled by the network itself.  Peak memory is a process-wide figure, so every measured run is
a child process of its own, which prints its row as JSON on its last line of standard output;
the parent collects the rows and, when a child fails, shows the child's own error rather than
only its exit status.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oamipc.atomic import atomic_output
from oamipc.data import Dataset, DataSplits
from oamipc.models import MobileNetV2, ResNet18, ResNet50

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

NETS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: ResNet18(seed=0),
    "resnet50": lambda: ResNet50(seed=0),
    "mobilenetv2": lambda: MobileNetV2(seed=0),
}

LABEL_BATCH = 16  # images per forward pass while the network labels its own inputs


def labelled_images(model: nn.Module, samples: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` seeded random ``size`` x ``size`` RGB images and the network's own predictions.

    Seeded weights and random inputs are enough for time and memory; labelling by the network
    gives every criterion and the MILP a consistent target without a data set.
    """
    x = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = torch.cat([model(x[i:i + LABEL_BATCH]).argmax(1) for i in range(0, samples, LABEL_BATCH)])
    return x, y


def random_image_splits(x: torch.Tensor, y: torch.Tensor) -> DataSplits:
    """The images as a train split, with their first 16 as a token test split."""
    return DataSplits(train=Dataset("random images", x, y), test=Dataset("random images", x[:16], y[:16]))


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (the kernel's high-water mark), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def cpu_seconds(since: float = 0.0) -> float:
    """User and system CPU seconds of this process (all its threads) since ``since``."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime - since


def load_average() -> float:
    """The one-minute load average: how shared the machine was while a row ran."""
    return os.getloadavg()[0]


def run_child(script: str, args: Sequence[str], label: str) -> dict[str, Any]:
    """Run ``script`` with ``args`` in a new Python process and return the JSON row it printed last.

    A failing child raises :class:`SystemExit` with its exit status and the tail of its standard
    error, so that a failure hours into a benchmark says why.
    """
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-30:])
        raise SystemExit(f"{label}: the run exited with status {done.returncode}; its last output:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
