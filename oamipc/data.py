"""Datasets: where calibration, importance and accuracy samples come from.

A data *spec* names one of:

* ``digits`` -- scikit-learn's bundled 8x8 handwritten digits (1797 images, no download), as
  ``(N, 1, 8, 8)`` float32 in [0, 1] (pixel / 16).  Split 70/30 into train/test, stratified
  per class with a fixed seed (see :func:`_split_digits`), so every run sees the same split.
* ``fashion-mnist`` -- the IDX files of Fashion-MNIST (gzip or not), read with numpy only:
  from ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``) or
  ``data_dir``; ``(N, 1, 28, 28)`` float32 in [0, 1]; the official 60k/10k split.
* a ``.pt`` file (``torch.load(weights_only=True)``) or ``.npz`` file (``allow_pickle=False``)
  holding ``x`` and optionally ``y``, ``x_test``, ``y_test``;
* ``pkg.module:function`` -- a callable returning a :class:`DataSplits`, a :class:`Dataset`, an
  ``(x, y)`` tuple or an ``x`` tensor.

Every input is validated once, when a :class:`Dataset` is built, so the rest of oamipc can rely
on: ``x`` float32 of shape ``(N, *sample_shape)``, finite, ``N >= 1``; ``y`` int64 of shape
``(N,)`` with non-negative class indices, or ``None``.  A failed check raises
:class:`~oamipc.errors.DataError` with a one-line message naming the source.

The tensors of cached datasets are shared between callers: treat them as read-only.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import logging
import math
import os
import re
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oamipc.errors import DataError, describe, first_line

__all__ = [
    "FASHION_MNIST_DIR", "DataSplits", "Dataset", "accuracy", "fashion_mnist_available", "load_data",
    "read_idx", "resize_images",
]

log = logging.getLogger(__name__)

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_PACKAGE = "dataset-fashion-mnist"
_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_DIGITS_TEST_FRACTION = 0.3
_DIGITS_SPLIT_SEED = 0
_CALLABLE_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


# --------------------------------------------------------------------------------------------
# The two containers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """Samples ``x`` (float32, ``(N, *sample_shape)``) and optional int64 class labels ``y``.

    Construction validates and normalises: a floating ``x`` of another precision is cast to
    float32; anything else that breaks the contract in the module docstring raises DataError.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor | None = None

    def __post_init__(self) -> None:
        x = self.x
        if not isinstance(x, torch.Tensor):
            raise DataError(f"{self.name}: x must be a torch.Tensor, got {type(x).__name__}; "
                            f"convert it with torch.as_tensor")
        if not x.is_floating_point():
            raise DataError(f"{self.name}: x has dtype {x.dtype}, expected floating point; convert it to float32 "
                            f"and scale it (e.g. uint8 images: x.float() / 255)")
        if x.dim() < 2:
            raise DataError(f"{self.name}: x has shape {tuple(x.shape)}, expected (N, *sample_shape) with at least "
                            f"2 dimensions; add a feature dimension (x[:, None])")
        if len(x) == 0:
            raise DataError(f"{self.name}: the data set is empty (x has shape {tuple(x.shape)}); "
                            f"give at least one sample")
        if x.dtype != torch.float32:
            x = x.float()
            object.__setattr__(self, "x", x)  # a frozen dataclass normalises through object.__setattr__
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            first = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])
            raise DataError(f"{self.name}: x contains {bad} NaN or infinite values (first in sample {first}); "
                            f"clean or drop those samples")
        if self.y is not None:
            y = self.y
            if not isinstance(y, torch.Tensor):
                raise DataError(f"{self.name}: y must be a torch.Tensor, got {type(y).__name__}; "
                                f"convert it with torch.as_tensor")
            if y.dim() != 1:
                raise DataError(f"{self.name}: y has shape {tuple(y.shape)}, expected class indices of shape (N,); "
                                f"for one-hot labels use y.argmax(1)")
            if len(y) != len(x):
                raise DataError(f"{self.name}: y has {len(y)} labels but x has {len(x)} samples; "
                                f"give one label per sample")
            if y.dtype != torch.int64:
                raise DataError(f"{self.name}: y has dtype {y.dtype}, expected int64 class indices; "
                                f"convert with y.long()")
            if int(y.min()) < 0:
                raise DataError(f"{self.name}: y contains negative labels (min {int(y.min())}); "
                                f"labels must be class indices 0..C-1")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 8, 8)``."""
        return tuple(self.x.shape[1:])

    @property
    def num_classes(self) -> int | None:
        """``max(y) + 1`` (classes are 0-based indices), or None for unlabelled data."""
        return None if self.y is None else int(self.y.max()) + 1

    def reshaped(self, sample_shape: tuple[int, ...]) -> Dataset:
        """The same samples viewed with another per-sample shape, e.g. ``(1, 8, 8)`` <-> ``(64,)``."""
        sample_shape = tuple(int(d) for d in sample_shape)
        if math.prod(sample_shape) != math.prod(self.sample_shape):
            raise DataError(f"{self.name}: cannot reshape samples of shape {self.sample_shape} "
                            f"({math.prod(self.sample_shape)} values) to {sample_shape} "
                            f"({math.prod(sample_shape)} values); use a model input shape with the same number "
                            f"of values, or resize_images")
        return Dataset(self.name, self.x.reshape(len(self.x), *sample_shape), self.y)

    def subset(self, idx: torch.Tensor | Sequence[int] | np.ndarray | slice) -> Dataset:
        """The samples at ``idx`` (indices, a boolean mask or a slice), in that order."""
        if not isinstance(idx, slice):
            idx = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
            if idx.dtype != torch.bool:
                idx = idx.long()
        return Dataset(self.name, self.x[idx], None if self.y is None else self.y[idx])

    def stratified_sample(self, n: int, *, seed: int) -> Dataset:
        """``n`` samples chosen deterministically by ``seed``, balanced over classes.

        With labels, the classes take turns: every class gives its 1st (random) sample, then its
        2nd, ...; classes that run out drop out of the rotation, and the order of the classes
        within a turn is itself seeded.  So class counts differ by at most one (unless a class is
        too small), and ``stratified_sample(num_classes)`` holds one sample per class -- the
        "one image per class" batch of the OAMIP paper.  Without labels: a seeded random subset.
        """
        n = int(n)
        if not 1 <= n <= len(self):
            raise DataError(f"{self.name}: cannot sample {n} of {len(self)} samples; ask for 1 to {len(self)}")
        gen = torch.Generator().manual_seed(int(seed))
        if self.y is None:
            return self.subset(torch.randperm(len(self), generator=gen)[:n])
        classes = torch.unique(self.y)
        class_rank = torch.empty(int(classes.max()) + 1, dtype=torch.long)
        class_rank[classes[torch.randperm(len(classes), generator=gen)]] = torch.arange(len(classes))
        turn = torch.empty(len(self), dtype=torch.long)
        for c in classes.tolist():
            members = (self.y == c).nonzero().flatten()
            turn[members[torch.randperm(len(members), generator=gen)]] = torch.arange(len(members))
        # Sort by (turn, seeded class rank): one key, since class_rank < len(classes).
        key = turn * len(classes) + class_rank[self.y]
        return self.subset(torch.argsort(key)[:n])


@dataclass(frozen=True, eq=False)
class DataSplits:
    """A train split (calibration, importance, fine-tuning) and a test split (accuracy)."""

    train: Dataset
    test: Dataset

    def __post_init__(self) -> None:
        if self.train.sample_shape != self.test.sample_shape:
            raise DataError(f"train samples ({self.train.name}) have shape {self.train.sample_shape} but test samples "
                            f"({self.test.name}) have shape {self.test.sample_shape}; give both splits the same shape")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_data(spec: str, *, data_dir: str | os.PathLike[str] | None = None) -> DataSplits:
    """Load the data named by ``spec`` (see the module docstring) as train/test splits.

    ``data_dir`` overrides the directory of ``fashion-mnist``; other specs ignore it.
    """
    spec = str(spec).strip()
    key = spec.lower()
    if key in ("digits", "fashion-mnist", "fashion_mnist"):
        if data_dir is not None and key == "digits":
            log.warning("--data-dir %s is ignored for the built-in digits data set", data_dir)
        return _load_digits() if key == "digits" else _load_fashion_mnist(_fashion_dir(data_dir))
    if data_dir is not None:
        log.warning("--data-dir %s is ignored for data spec %s (it only locates fashion-mnist)", data_dir, spec)
    suffix = Path(spec).suffix.lower()
    if suffix in (".pt", ".pth", ".npz"):
        return _load_array_file(Path(spec))
    if _CALLABLE_SPEC.fullmatch(spec):
        return _load_callable(spec)
    if Path(spec).exists():
        raise DataError(f"data file {spec} has unsupported type {suffix or '(no suffix)'}; "
                        f"save x and y in a .pt (torch.save of a dict of tensors) or .npz (numpy.savez) file")
    raise DataError(f"unknown data spec {spec!r}: use digits, fashion-mnist, a .pt/.npz file, or pkg.module:function")


@functools.lru_cache(maxsize=1)
def _load_digits() -> DataSplits:
    """scikit-learn's bundled digits, pixels / 16, split by :func:`_split_digits` (cached)."""
    from sklearn.datasets import load_digits  # deferred: scikit-learn is slow to import

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    test = _split_digits(y)
    train = ~test
    return DataSplits(Dataset("digits/train", x[train], y[train]), Dataset("digits/test", x[test], y[test]))


def _split_digits(y: torch.Tensor) -> torch.Tensor:
    """Boolean test mask: per class, ``round(30%)`` of its samples, drawn with numpy seed 0.

    Implemented here rather than with ``sklearn.model_selection.train_test_split`` so that the
    split -- and the accuracies documented for the shipped examples -- cannot change with the
    scikit-learn version.  Gives 1258 train / 539 test samples.
    """
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    labels = y.numpy()
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test[rng.permutation(members)[: round(_DIGITS_TEST_FRACTION * len(members))]] = True
    return torch.from_numpy(test)


def _fashion_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    return Path(data_dir if data_dir is not None else FASHION_MNIST_DIR)


def _idx_path(directory: Path, stem: str) -> Path | None:
    """The file ``stem`` or ``stem.gz`` in ``directory`` (also the ``stem.idx*`` spelling), if any."""
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = directory / name
        if path.is_file():
            return path
    return None


def fashion_mnist_available(data_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether the four Fashion-MNIST IDX files are present (tests skip on False)."""
    directory = _fashion_dir(data_dir)
    return all(_idx_path(directory, stem) is not None for stem in _FASHION_FILES.values())


def _load_fashion_mnist(directory: Path) -> DataSplits:
    # Cache on the resolved directory: tests and sweeps load the 70k images many times.
    return _load_fashion_mnist_cached(str(directory.resolve()))


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist_cached(directory: str) -> DataSplits:
    root = Path(directory)
    paths = {key: _idx_path(root, stem) for key, stem in _FASHION_FILES.items()}
    missing = [_FASHION_FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise DataError(f"Fashion-MNIST files {', '.join(missing)} (or .gz) not found in {root}; install them with "
                        f"'apt-get install {_FASHION_PACKAGE}' or point --data-dir at a directory holding them")
    splits = []
    for part in ("train", "test"):
        images = read_idx(paths[f"{part}_x"], magic=0x00000803)  # uint8, 3 dimensions
        labels = read_idx(paths[f"{part}_y"], magic=0x00000801)  # uint8, 1 dimension
        if len(images) != len(labels):
            raise DataError(f"{paths[part + '_x']} holds {len(images)} images but {paths[part + '_y']} holds "
                            f"{len(labels)} labels; reinstall the files ({_FASHION_PACKAGE})")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        splits.append(Dataset(f"fashion-mnist/{part}", x, torch.from_numpy(labels.astype(np.int64))))
    log.info("loaded Fashion-MNIST from %s: %d train, %d test images", root, len(splits[0]), len(splits[1]))
    return DataSplits(*splits)


_IDX_TYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str], *, magic: int | None = None) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), gzip-compressed or not, into a numpy array.

    Header: two zero bytes, a type code (0x08 = uint8, ... 0x0E = float64), the number of
    dimensions, then each dimension as a big-endian uint32; the values follow, big-endian.
    A malformed magic number (or one other than ``magic``, when given), a truncated file or
    trailing bytes raise DataError.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc.strerror or exc}; check the path and permissions") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"IDX file {path} is a truncated or corrupt gzip file ({exc}); "
                            f"download or install it again") from exc
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than the 4-byte magic number; "
                        f"download or install it again")
    found_magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[0] or raw[1] or code not in _IDX_TYPES or ndim == 0 or (magic is not None and found_magic != magic):
        wanted = f"0x{magic:08x}" if magic is not None else "0x0000TTDD (TT: a type code, DD: dimensions)"
        raise DataError(f"{path} is not a valid IDX file: magic number 0x{found_magic:08x}, expected {wanted}; "
                        f"the file is corrupt or of another format, download or install it again")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated inside its header ({len(raw)} of {header} bytes); "
                        f"download or install it again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    count = math.prod(dims)
    expected, found = count * dtype.itemsize, len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise DataError(f"IDX file {path} is {what}: shape {dims} needs {expected} data bytes, found {found}; "
                        f"download or install it again")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _load_array_file(path: Path) -> DataSplits:
    """A .pt/.npz file holding x and optionally y, x_test, y_test."""
    if not path.is_file():
        raise DataError(f"data file {path} not found; check the path (relative paths start in {Path.cwd()})")
    arrays: dict[str, Any]
    if path.suffix.lower() == ".npz":
        arrays = _read_npz(path)
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"cannot load {path} with torch.load(weights_only=True): {_torch_load_reason(exc)}; "
                            f"save a dict of tensors with torch.save({{'x': x, 'y': y}}, path)") from exc
        if not isinstance(loaded, dict):
            raise DataError(f"{path} holds a {type(loaded).__name__}, expected a dict with keys x, y (optional), "
                            f"x_test, y_test (optional); save one with torch.save({{'x': x, 'y': y}}, path)")
        arrays = loaded
    return _splits_from_arrays(arrays, str(path))


def _torch_load_reason(exc: Exception) -> str:
    """The useful part of torch.load's (long, multi-paragraph) error message."""
    text = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return f"it holds a {refused.group(1)} object, which weights-only loading refuses"
    return describe(exc)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz archive; object (pickled) arrays are refused."""
    with path.open("rb") as fh:
        if fh.read(4) != b"PK\x03\x04":  # np.load would report any non-zip file as pickled data
            raise DataError(f"cannot read {path}: it is not an .npz (zip) archive; save it with "
                            f"numpy.savez(path, x=x, y=y)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DataError(f"{path} is a single .npy array, not an .npz archive; save x and y with "
                                f"numpy.savez(path, x=x, y=y)")
            return {key: npz[key] for key in npz.files}
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(f"{path} holds object (pickled) arrays, which are not loaded for safety; "
                            f"save plain numeric arrays with numpy.savez") from exc
        raise DataError(f"cannot read {path} as .npz: {exc}; save it with numpy.savez(path, x=x, y=y)") from exc
    except Exception as exc:
        raise DataError(f"cannot read {path} as .npz ({type(exc).__name__}: {exc}); "
                        f"save it with numpy.savez(path, x=x, y=y)") from exc


def _splits_from_arrays(arrays: dict[str, Any], source: str) -> DataSplits:
    found = ", ".join(sorted(map(str, arrays))) or "none"
    if "x" not in arrays:
        raise DataError(f"{source} has no 'x' array (found keys: {found}); store the inputs under 'x' "
                        f"and the labels under 'y'")
    if "y_test" in arrays and "x_test" not in arrays:
        raise DataError(f"{source} has 'y_test' but no 'x_test' (found keys: {found}); "
                        f"store the test inputs under 'x_test'")
    train = Dataset(f"{source}:train", _features(arrays["x"], f"{source}: x"),
                    _labels(arrays.get("y"), f"{source}: y"))
    if "x_test" not in arrays:
        log.warning("%s has no x_test/y_test: the test split is the train split, so accuracies are measured "
                    "on the calibration data", source)
        return DataSplits(train, Dataset(f"{source}:test(=train)", train.x, train.y))
    test = Dataset(f"{source}:test", _features(arrays["x_test"], f"{source}: x_test"),
                   _labels(arrays.get("y_test"), f"{source}: y_test"))
    return DataSplits(train, test)


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "biufc":  # strings, objects, dates: nothing torch can hold
            raise TypeError(f"numpy dtype {array.dtype} is not numeric")
        return torch.as_tensor(array)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{where} cannot be converted to a tensor ({type(value).__name__}: {exc}); "
                        f"store a numeric array") from exc


def _features(value: Any, where: str) -> torch.Tensor:
    """``x`` as float32; integer or boolean pixels are refused rather than silently scaled."""
    x = _as_tensor(value, where)
    if not x.is_floating_point():
        raise DataError(f"{where} has dtype {x.dtype}, expected floating point; convert and scale it "
                        f"(e.g. uint8 images: x.astype('float32') / 255)")
    return x.float()


def _labels(value: Any, where: str) -> torch.Tensor | None:
    """``y`` as int64 class indices; integral floats are accepted, fractions and negatives are not."""
    if value is None:
        return None
    y = _as_tensor(value, where)
    if y.dtype == torch.bool or y.is_complex():
        raise DataError(f"{where} has dtype {y.dtype}, expected integer class indices 0..C-1")
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()) or not bool((y == y.round()).all()):
            raise DataError(f"{where} holds non-integer labels (e.g. {_first_fraction(y)}); "
                            f"labels must be class indices 0..C-1")
    if y.numel() and int(y.min()) < 0:
        raise DataError(f"{where} holds negative labels (min {int(y.min())}); labels must be class indices 0..C-1")
    return y.long()


def _first_fraction(y: torch.Tensor) -> float:
    bad = y[~torch.isfinite(y) | (y != y.round())]
    return float(bad.flatten()[0])


def _load_callable(spec: str) -> DataSplits:
    """Import ``pkg.module:function`` (also from the current directory), call it, wrap the result."""
    module_name, attr_path = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.split(".")[0] or os.getcwd() in sys.path:
            raise DataError(f"cannot import {module_name} for data spec {spec}: {exc}; install the module or "
                            f"add its directory to PYTHONPATH") from exc
        # A module next to the user (``oamipc compile --data mydata:load``) is not on sys.path
        # when oamipc runs as a console script; look there once.
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc2:
            raise DataError(f"cannot import {module_name} for data spec {spec}: {exc2}; install the module or "
                            f"add its directory to PYTHONPATH") from exc2
        finally:
            sys.path.remove(os.getcwd())
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise DataError(f"module {module_name} has no attribute {attr_path} (data spec {spec}); "
                            f"check the name after the colon")
        target = getattr(target, part)
    if not callable(target):
        raise DataError(f"{spec} is a {type(target).__name__}, not a function; name a function returning the data")
    result = target()
    return _as_splits(result, spec)


def _as_splits(result: Any, source: str) -> DataSplits:
    """Wrap what a data function returned as DataSplits."""
    if isinstance(result, DataSplits):
        return result
    if isinstance(result, Dataset):
        log.warning("%s returned one Dataset: the test split is the train split", source)
        return DataSplits(result, result)
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return _splits_from_arrays({"x": result[0], "y": result[1]}, source)
    if isinstance(result, (torch.Tensor, np.ndarray)):
        return _splits_from_arrays({"x": result}, source)
    raise DataError(f"{source} returned a {type(result).__name__}; return a DataSplits, a Dataset, an (x, y) "
                    f"tuple or an x tensor")


# --------------------------------------------------------------------------------------------
# Transforms and evaluation
# --------------------------------------------------------------------------------------------


def resize_images(ds: Dataset, hw: tuple[int, int]) -> Dataset:
    """Images ``(N, C, H, W)`` resized to ``hw`` with bilinear interpolation; labels kept.

    Used to feed the 8x8 digits to a 28x28 network (and back).  Uses
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=True)``:
    antialiasing only matters when shrinking, where it averages instead of skipping pixels.
    Values stay within the input range (bilinear weights are a convex combination).
    """
    height, width = (int(v) for v in hw)
    if ds.x.dim() != 4:
        raise DataError(f"{ds.name}: resize_images needs images of shape (N, C, H, W), got {tuple(ds.x.shape)}; "
                        f"reshape first (Dataset.reshaped)")
    if height < 1 or width < 1:
        raise DataError(f"{ds.name}: cannot resize to {height}x{width}; give a positive height and width")
    x = torch.nn.functional.interpolate(ds.x, size=(height, width), mode="bilinear", align_corners=False,
                                        antialias=True)
    return Dataset(f"{ds.name}@{height}x{width}", x, ds.y)


def accuracy(model: Callable[[torch.Tensor], torch.Tensor], ds: Dataset, *, batch_size: int = 512) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``argmax(model(x))`` over ``ds``, without gradients.

    An ``nn.Module`` is evaluated in eval mode and put back in its previous mode afterwards.
    """
    if ds.y is None:
        raise DataError(f"{ds.name} has no labels, so accuracy cannot be measured; give data with a 'y' array")
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(ds), batch_size):
                xb = ds.x[start:start + batch_size]
                try:
                    out = model(xb)
                except RuntimeError as exc:
                    if start:
                        raise
                    raise DataError(f"the model rejected samples of shape {ds.sample_shape} from {ds.name}: "
                                    f"{first_line(exc)}; match the data to the model input "
                                    f"(Dataset.reshaped or resize_images)") from exc
                if isinstance(out, (tuple, list)):
                    out = out[0]
                correct += int((out.argmax(dim=-1) == ds.y[start:start + batch_size]).sum())
    finally:
        if module is not None:
            module.train(was_training)
    return correct / len(ds)
