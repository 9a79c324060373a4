"""CIFAR-10/100 from a local directory (python-pickle layout), held as uint8 tensors on the device,
with augmentation done on tensors (on the GPU when training there).

No download and no torchvision: the whole dataset (150 MB as uint8) lives on the training device,
batches are index gathers, and the random crop + flip of a batch is one gather from the padded
images. Every random choice of an epoch (order, crop offsets, flips) comes from a CPU generator
seeded by (seed, epoch, purpose), so the data stream of epoch e is a pure function of the seed: a
resumed run sees exactly the batches an uninterrupted run would, and the augmentation is the same on
CPU and GPU.

Layouts read (the archives of https://www.cs.toronto.edu/~kriz/cifar.html, unpacked):
    <data-dir>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch
    <data-dir>/cifar-100-python/train, test
Each file is a pickle of a dict with `data` (N, 3072) uint8 (R plane, G plane, B plane, row-major)
and `labels` (CIFAR-10) or `fine_labels` (CIFAR-100).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Normalisation of the official training script (cifar.py), per RGB channel.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGE_SIZE = 32
CROP_PADDING = 4

DATASETS = ("cifar10", "cifar100", "synthetic")


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    archive: str
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    label_key: str
    num_classes: int


LAYOUTS: Dict[str, CifarLayout] = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
        10,
    ),
    "cifar100": CifarLayout(
        "cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",), "fine_labels", 100
    ),
}


class DatasetError(ValueError):
    """The dataset directory is incomplete or malformed; the message names what was expected."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """Files of the dataset are missing; the message lists the expected files."""


@dataclass
class ImageSet:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64, on one device."""

    images: Tensor
    labels: Tensor
    num_classes: int

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device), self.num_classes)


# --------------------------------------------------------------------------------------------
# Reading the pickle layout
# --------------------------------------------------------------------------------------------

# The only globals a CIFAR pickle needs (numpy arrays). Anything else is refused: a pickle from an
# untrusted directory must not run code.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")


def resolve_dataset_dir(data_dir: str, dataset: str) -> str:
    """The folder holding the batch files: `data_dir/<folder>`, or `data_dir` itself if it is it."""
    layout = LAYOUTS[dataset]
    nested = os.path.join(data_dir, layout.folder)
    if os.path.isdir(nested):
        return nested
    if os.path.basename(os.path.normpath(data_dir)) == layout.folder:
        return data_dir
    return nested


def expected_files(data_dir: str, dataset: str) -> List[str]:
    layout = LAYOUTS[dataset]
    folder = os.path.join(data_dir, layout.folder)
    return [os.path.join(folder, f) for f in layout.train_files + layout.test_files]


def _missing_message(data_dir: str, dataset: str, missing: Sequence[str]) -> str:
    expected = "\n  ".join(expected_files(data_dir, dataset))
    return (
        f"--data-dir {data_dir!r}: the {dataset} dataset is incomplete; missing "
        f"{', '.join(missing)}. Expected the python-pickle layout (the unpacked archive "
        f"{LAYOUTS[dataset].archive} from https://www.cs.toronto.edu/~kriz/cifar.html):"
        f"\n  {expected}"
    )


def _read_batch_file(path: str, layout: CifarLayout) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as err:  # truncated, not a pickle, foreign globals: all mean "malformed"
        raise DatasetError(
            f"{path}: malformed CIFAR batch file, could not unpickle it "
            f"({type(err).__name__}: {err})"
        ) from err
    if not isinstance(entry, dict):
        raise DatasetError(
            f"{path}: malformed CIFAR batch file, expected a dict, got {type(entry).__name__}"
        )
    entry = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}
    for key in ("data", layout.label_key):
        if key not in entry:
            raise DatasetError(
                f"{path}: malformed CIFAR batch file, expected keys 'data' and "
                f"{layout.label_key!r}, got {sorted(map(str, entry))}"
            )
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[layout.label_key])
    pixels = 3 * IMAGE_SIZE * IMAGE_SIZE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise DatasetError(
            f"{path}: malformed CIFAR batch file, expected 'data' uint8 of shape "
            f"(N, {pixels}), got {data.dtype} {data.shape}"
        )
    if (
        labels.ndim != 1
        or labels.shape[0] != data.shape[0]
        or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise DatasetError(
            f"{path}: malformed CIFAR batch file, expected {data.shape[0]} integer "
            f"labels, got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DatasetError(
            f"{path}: malformed CIFAR batch file, labels must lie in "
            f"[0, {layout.num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    return data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE), labels.astype(np.int64)


def load_cifar(data_dir: str, dataset: str, train: bool) -> ImageSet:
    """Reads the train or test split of CIFAR-10/100 from `data_dir` (no download)."""
    if dataset not in LAYOUTS:
        raise ValueError(f"dataset: expected one of {tuple(LAYOUTS)}, got {dataset!r}")
    layout = LAYOUTS[dataset]
    folder = resolve_dataset_dir(data_dir, dataset)
    names = layout.train_files if train else layout.test_files
    missing = [
        n
        for n in layout.train_files + layout.test_files
        if not os.path.isfile(os.path.join(folder, n))
    ]
    if missing:
        raise DatasetNotFoundError(_missing_message(data_dir, dataset, missing))
    parts = [_read_batch_file(os.path.join(folder, n), layout) for n in names]
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate([p[0] for p in parts])))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageSet(images, labels, layout.num_classes)


# --------------------------------------------------------------------------------------------
# Generated data: synthetic sets and CIFAR-format directories for tests
# --------------------------------------------------------------------------------------------


def _generated_images(
    num_images: int, num_classes: int, seed: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Learnable random images: a smooth per-class colour pattern plus per-image noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=num_images, dtype=np.int64)
    # class prototypes: 4x4 random colour grids upsampled to 32x32 (low frequency)
    coarse = rng.uniform(40, 215, size=(num_classes, 3, 4, 4))
    prototypes = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)
    images = np.empty((num_images, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    chunk = 4096
    for start in range(0, num_images, chunk):
        idx = slice(start, min(start + chunk, num_images))
        noise = rng.normal(0, 40, size=(idx.stop - idx.start, 3, IMAGE_SIZE, IMAGE_SIZE))
        images[idx] = np.clip(prototypes[labels[idx]] + noise, 0, 255).astype(np.uint8)
    return images, labels


def synthetic_dataset(
    train_size: int, test_size: int, num_classes: int = 100, seed: int = 0
) -> Tuple[ImageSet, ImageSet]:
    """CIFAR-shaped generated train and test sets (`--dataset synthetic`), independent of the run
    seed so that every run and every rank sees the same data."""
    for name, value in (("train_size", train_size), ("test_size", test_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    images, labels = _generated_images(train_size + test_size, num_classes, seed)

    def as_set(sl):
        return ImageSet(
            torch.from_numpy(images[sl].copy()),
            torch.from_numpy(labels[sl].copy()),
            num_classes,
        )

    return as_set(slice(0, train_size)), as_set(slice(train_size, None))


def write_cifar_directory(
    root: str, dataset: str = "cifar10", train_size: int = 100, test_size: int = 20, seed: int = 0
) -> str:
    """Writes a small dataset in the exact CIFAR python-pickle layout under `root` (for tests and
    smoke runs) and returns `root`, usable as --data-dir. Train images are split evenly over the
    layout's train files, like the real archives; keys are bytes, as in the original pickles."""
    layout = LAYOUTS[dataset]
    folder = os.path.join(root, layout.folder)
    os.makedirs(folder, exist_ok=True)
    images, labels = _generated_images(train_size + test_size, layout.num_classes, seed)
    flat = images.reshape(images.shape[0], -1)
    splits = np.array_split(np.arange(train_size), len(layout.train_files))
    files = list(zip(layout.train_files, splits))
    files.append((layout.test_files[0], np.arange(train_size, train_size + test_size)))
    for name, idx in files:
        entry = {
            b"batch_label": name.encode(),
            b"data": flat[idx],
            layout.label_key.encode(): labels[idx].tolist(),
        }
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f, protocol=2)
    return root


def dataset_classes(dataset: str, synthetic_classes: int) -> int:
    """The number of classes of --dataset, known before any file is read."""
    if dataset == "synthetic":
        return synthetic_classes
    if dataset not in LAYOUTS:
        raise ValueError(f"--dataset: expected one of {DATASETS}, got {dataset!r}")
    return LAYOUTS[dataset].num_classes


def load_datasets(
    dataset: str, data_dir: Optional[str], synthetic_size: int, synthetic_classes: int = 100
) -> Tuple[ImageSet, ImageSet]:
    """(train, test) for --dataset; synthetic: `synthetic_size` train and size // 5 test images."""
    if dataset == "synthetic":
        return synthetic_dataset(synthetic_size, max(1, synthetic_size // 5), synthetic_classes)
    if dataset not in LAYOUTS:
        raise ValueError(f"--dataset: expected one of {DATASETS}, got {dataset!r}")
    if data_dir is None:
        raise DatasetNotFoundError(
            f"--data-dir: required for --dataset {dataset} (nothing is "
            f"downloaded); expected files: " + ", ".join(expected_files("<data-dir>", dataset))
        )
    return load_cifar(data_dir, dataset, train=True), load_cifar(data_dir, dataset, train=False)


# --------------------------------------------------------------------------------------------
# Batching and augmentation on tensors
# --------------------------------------------------------------------------------------------

_PURPOSE_ORDER, _PURPOSE_AUGMENT = 0, 1


def epoch_generator(seed: int, epoch: int, purpose: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, purpose), well mixed."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(purpose)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


_NORMALIZATION: Dict[torch.device, Tuple[Tensor, Tensor]] = {}


def _normalization(device: torch.device) -> Tuple[Tensor, Tensor]:
    """(mean, std) as (1, 3, 1, 1) tensors on `device`, made once (no copy at every batch)."""
    if device not in _NORMALIZATION:
        _NORMALIZATION[device] = (
            torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1),
        )
    return _NORMALIZATION[device]


def normalize(images_uint8: Tensor, channels_last: bool = False) -> Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised with the CIFAR mean/std of the official script."""
    mean, std = _normalization(images_uint8.device)
    out = (images_uint8.float().div_(255.0) - mean).div_(std)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out.contiguous(memory_format=fmt)


def crop_and_flip(images_uint8: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
    """Random crop with 4-pixel zero padding, then horizontal flip, as one gather.

    images_uint8 (N, 3, 32, 32); offsets (N, 2) int64 in [0, 8] (top, left of the crop in the
    padded image); flips (N,) bool. Zero padding in pixel space matches torchvision's RandomCrop
    (the padding becomes -mean/std after normalisation). Returns (N, 3, 32, 32) uint8 (a
    channels-last strided view).
    """
    n, size = images_uint8.shape[0], images_uint8.shape[-1]
    padded = F.pad(images_uint8, (CROP_PADDING,) * 4).permute(0, 2, 3, 1)  # (N, H+8, W+8, 3)
    ramp = torch.arange(size, device=images_uint8.device)
    rows = offsets[:, 0, None] + ramp  # (N, 32)
    cols = offsets[:, 1, None] + torch.where(flips[:, None], size - 1 - ramp, ramp)
    batch = torch.arange(n, device=images_uint8.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def check_global_batch(name: str, batch_size: int, world_size: int) -> None:
    """A global batch splits evenly over the processes (ValueError naming `name` otherwise)."""
    if batch_size % world_size:
        raise ValueError(
            f"{name} {batch_size}: expected a multiple of the number of processes "
            f"({world_size}); it is the global batch, split over them"
        )


class BatchStream:
    """Batches of one split for one rank, DistributedSampler-equivalent.

    Training order: a permutation per epoch (from the seed and the epoch), padded by repeating its
    head to a multiple of `world_size` (as DistributedSampler does). The global batch b is
    positions [b*B, (b+1)*B) of that order; rank r takes every world_size-th of them starting at r.
    This is exactly DistributedSampler's shard (rank r: order[r::world]) cut in batches of
    B/world_size, so `batch_size` is the global batch of the paper's hyperparameters whatever the
    number of processes, and a run on k processes averages the same gradients as on one (up to
    BatchNorm, whose statistics are per process).

    Evaluation: the split in order, sharded the same way without padding.
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        *,
        train: bool,
        augment: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        max_steps: Optional[int] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        check_global_batch("batch size", batch_size, world_size)
        self.data, self.batch_size, self.train, self.augment = data, batch_size, train, augment
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last, self.max_steps = channels_last, max_steps

    def _order_length(self) -> int:
        n = len(self.data)
        if self.train:
            return -(-n // self.world_size) * self.world_size
        return n

    def __len__(self) -> int:
        steps = -(-self._order_length() // self.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def order(self, epoch: int) -> Tensor:
        n = len(self.data)
        if not self.train:
            return torch.arange(n)
        perm = torch.randperm(n, generator=epoch_generator(self.seed, epoch, _PURPOSE_ORDER))
        pad = self._order_length() - n
        return torch.cat([perm, perm[:pad]]) if pad else perm

    def epoch(self, epoch: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """Yields (inputs float32 (n, 3, 32, 32) normalised, targets (n,)) on the data's device.

        The order and the augmentation parameters of the whole epoch are drawn up front (one per
        position of the epoch's order, the same on every rank) and copied to the device once, so
        a step does no host-to-device transfer."""
        device = self.data.images.device
        order = self.order(epoch)
        augment = self.train and self.augment
        if augment:
            augment_gen = epoch_generator(self.seed, epoch, _PURPOSE_AUGMENT)
            offsets = torch.randint(
                0, 2 * CROP_PADDING + 1, (order.numel(), 2), generator=augment_gen
            ).to(device)
            flips = (torch.rand(order.numel(), generator=augment_gen) < 0.5).to(device)
        order = order.to(device)
        mine = slice(self.rank, None, self.world_size)
        for step in range(len(self)):
            batch = slice(step * self.batch_size, (step + 1) * self.batch_size)
            index = order[batch][mine]
            images = self.data.images.index_select(0, index)
            if augment:
                images = crop_and_flip(images, offsets[batch][mine], flips[batch][mine])
            yield normalize(images, self.channels_last), self.data.labels.index_select(0, index)
