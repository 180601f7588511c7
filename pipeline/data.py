"""Datasets and the deterministic batches drawn from them.

Small sources (Fashion-MNIST idx files, scikit-learn digits, CIFAR python batches, synthetic
noise) are held in memory as uint8 images: `ImageData`. An ImageFolder tree (ImageNet) is
streamed: `ImageFolderData` holds file paths and labels, and images are decoded batch by
batch, by loader processes, only where batches are drawn (the pipeline's first stage).
Batches depend only on (seed, epoch), so a run, a resumed run and a pipeline's first stage
all see the same ones.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import io
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, TypeVar

import numpy as np
import torch

from pipeline.lifeline import exit_with, forkserver
from pipeline.views import Photometric, photometric_view, photometric_views, view_block

if TYPE_CHECKING:
    from pipeline.config import Config

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion_mnist", "digits", "cifar10", "cifar100", "imagefolder", "synthetic")
T = TypeVar("T")
Part = Callable[[int], tuple[int, int]] | None  # a batch's size -> the rows [start, end) this process takes (None: all)


def rows_of(batch: T, part: Part) -> T:
    """The rows of a batch (a tensor or a list) that `part` takes."""
    if part is None:
        return batch
    start, end = part(len(batch))
    return batch[start:end]


class DataError(RuntimeError):
    """Data that is missing or malformed; the message says how to get it right."""


HISTOGRAM_CHUNK = 1 << 22  # pixels counted at a time: np.bincount makes an int64 copy (32 MB) of what it counts


def channel_statistics(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel mean and std (ddof 1) of uint8 N×C×H×W images read as values in [0, 1], in float32.

    From each channel's histogram of its 256 values: integer counts, then float64 sums of 256 terms, so no thread
    count changes a bit (processes with different counts must normalise alike) and no float copy of the images is
    made. It replaced numpy's float64 mean and std of such a copy (8 bytes a pixel, twice: 0.75 GB for Fashion-MNIST,
    2.5 GB for CIFAR-10, in every process that loads the data); both round the same quotient to float32, so they differ
    only where it lies within float64 error of a float32 rounding tie (~1e-8 a value): equal on every data set here.
    """
    n, channels = images.shape[:2]
    rows = max(1, HISTOGRAM_CHUNK // max(1, math.prod(images.shape[2:])))  # images per chunk
    values = np.arange(256, dtype=np.float64) / 255
    means, stds = [], []
    for c in range(channels):
        counts = np.zeros(256, dtype=np.int64)
        for start in range(0, n, rows):
            counts += np.bincount(images[start:start + rows, c].reshape(-1).numpy(), minlength=256)
        total = int(counts.sum())
        mean = (counts * values).sum() / total
        means.append(mean)
        stds.append(math.sqrt((counts * (values - mean) ** 2).sum() / (total - 1)))
    return torch.tensor(means, dtype=torch.float32), torch.tensor(stds, dtype=torch.float32).clamp_min(1e-3)


@dataclass
class ImageData:
    """Train and test images (uint8, N×C×H×W) with labels, and the train set's channel statistics."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        for part, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if len(x) != len(y):
                raise DataError(f"the {part} set has {len(x)} images but {len(y)} labels; the files do not belong together")
        self.mean, self.std = channel_statistics(self.train_x)

    def train_images(self, batches: list[torch.Tensor], generator: torch.Generator, use_augment: bool,
                     start: int = 0, part: Part = None,
                     recipes: tuple[Photometric, ...] = ()) -> Iterator[torch.Tensor]:
        """The uint8 training images of each index batch from batch `start` on, in order (only `part`'s rows);
        augmented (pad 4, random crop, flip, then each view's photometric recipe) from `generator`, which the
        skipped batches and rows draw from too."""
        for i, idx in enumerate(batches):
            x = self.train_x[idx]
            if use_augment:
                x = photometric_views(augment(x, generator), recipes, generator)
            if i >= start:
                yield rows_of(x, part)

    def test_images(self, batch_size: int, part: Part = None) -> Iterator[torch.Tensor]:
        """The uint8 test images in order, batch by batch (only `part`'s rows)."""
        for i in range(0, len(self.test_y), batch_size):
            yield rows_of(self.test_x[i : i + batch_size], part)

    def train_images_at(self, indices: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        """The training images at `indices`, not augmented, batch by batch."""
        for i in range(0, len(indices), batch_size):
            yield self.train_x[indices[i : i + batch_size]]

    def subset(self, n: int) -> ImageData:
        """Only the first n training images (the statistics are the subset's)."""
        return ImageData(self.train_x[:n], self.train_y[:n], self.test_x, self.test_y, self.num_classes)

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def input_size(self) -> int:
        return self.train_x.shape[2]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images to float on their device, standardised per channel with the train set's statistics."""
        return normalize(x, *stats_on(self, x.device))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images to float, standardised per channel; the same bits on a GPU as on the CPU."""
    # 255 as a tensor on x's device: CUDA divides by a CPU scalar as a product with its reciprocal (one bit off)
    x = x.float().div_(mean.new_full((), 255.0))
    return (x - mean[None, :, None, None]) / std[None, :, None, None]


def pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """normalize's inverse: the uint8 images a normalised batch was made from (InfoPro's decoders reconstruct them)."""
    x = x * std[None, :, None, None] + mean[None, :, None, None]
    return x.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def stats_on(data: Data, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The data's channel mean and std on `device`, copied there once (not once per batch)."""
    cache = data.__dict__.setdefault("_stats_on", {})
    if device not in cache:
        cache[device] = (data.mean.to(device), data.std.to(device))
    return cache[device]


def to_device(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU through pinned memory with a non-blocking copy, so the host need not wait
    (a tensor already there passes as it is)."""
    if device is None or device.type == "cpu" or t.device == device:
        return t
    return t.pin_memory().to(device, non_blocking=True)


# --- readers -------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (MNIST format, optionally gzipped) into a numpy array."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise DataError(f"{path} is a damaged gzip file ({err}); download or copy it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {body.size} bytes")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_fashion_mnist(data_dir: str | None) -> ImageData:
    """Fashion-MNIST from idx files: Debian's dataset-fashion-mnist, or any folder in that or torchvision's layout."""
    root = Path(data_dir or FASHION_MNIST_DIR)
    arrays = {}
    for part in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        path = _find_idx(root, part)
        if path is None:
            raise DataError(
                f"Fashion-MNIST file {part}[.gz] not found under {root}; install it with "
                "'apt-get install dataset-fashion-mnist' or set data_dir to a folder holding the idx files"
            )
        arrays[part] = torch.from_numpy(read_idx(path).copy())
    return ImageData(
        train_x=arrays["train-images-idx3-ubyte"][:, None],
        train_y=arrays["train-labels-idx1-ubyte"].long(),
        test_x=arrays["t10k-images-idx3-ubyte"][:, None],
        test_y=arrays["t10k-labels-idx1-ubyte"].long(),
        num_classes=10,
    )


def load_digits_data(test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's bundled 8×8 digits (1797 images), split by a fixed permutation.

    Its file is read as `sklearn.datasets.load_digits` reads it, without importing scikit-learn:
    that import took 1.5 s in every process that loaded the digits (launcher, stage 1, each test).
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():
        raise DataError("the digits data is scikit-learn's datasets/data/digits.csv.gz; pip install scikit-learn")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")  # 64 pixel values (0..16), then the label
    images = torch.from_numpy(np.clip(table[:, :-1].reshape(-1, 8, 8) * 16, 0, 255).astype(np.uint8))[:, None]
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return ImageData(images[train], labels[train], images[test], labels[test], num_classes=10)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR's python batches that builds numpy arrays and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("copyreg", "_reconstructor"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _not_a_cifar_batch(path: Path, why: str) -> DataError:
    return DataError(f"{path} is not a CIFAR python batch ({why}); download the dataset again")


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch file's images (N×3×32×32 uint8) and labels; anything else in the file is a DataError naming it."""
    if not path.is_file():
        raise DataError(
            f"CIFAR file {path} not found; download the python version from "
            "https://www.cs.toronto.edu/~kriz/cifar.html and set data_dir to the folder that holds it"
        )
    try:
        raw = path.read_bytes()
    except OSError as err:  # a file-system error, not a damaged batch
        raise DataError(f"cannot read CIFAR file {path} ({err.strerror}); check the file and its permissions") from None
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except MemoryError:  # the machine's, not the file's
        raise
    except Exception as err:  # damaged bytes can raise almost any exception from pickle (its docs say so)
        why = " ".join(str(err).split())  # one line: some of pickle's messages span two
        raise _not_a_cifar_batch(path, f"{type(err).__name__}: {why}" if why else type(err).__name__) from None
    if not isinstance(batch, dict):
        raise _not_a_cifar_batch(path, f"it holds a {type(batch).__name__}, not a dict")
    for key in (b"data", label_key):
        if key not in batch:
            raise _not_a_cifar_batch(path, f"it has no {key!r} entry")
    data, labels = batch[b"data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size % 3072:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _not_a_cifar_batch(path, f"its b'data' is a {what}, not rows of 3×32×32 = 3072 bytes")
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels = labels.tolist()
    # ints only: torch.tensor would truncate floats to labels, and fail on ints beyond int64
    if not isinstance(labels, list) or not all(type(v) is int and -2**63 <= v < 2**63 for v in labels):
        raise _not_a_cifar_batch(path, f"its {label_key!r} is not a list of integers")
    images = data.reshape(-1, 3, 32, 32)
    if len(images) != len(labels):
        raise _not_a_cifar_batch(path, f"it has {len(images)} images but {len(labels)} labels")
    return torch.from_numpy(images.copy()), torch.tensor(labels, dtype=torch.long)


def load_cifar(data_dir: str | None, num_classes: int) -> ImageData:
    """CIFAR-10/100 from the official python-format batches in a local folder (never downloaded).

    torchvision's CIFAR classes check the md5 of the full official files, so they cannot read
    a subset or a test fixture; this reads the same format with a restricted unpickler.
    """
    root = Path(data_dir or "data")
    if num_classes == 10:
        folder, label_key = root / "cifar-10-batches-py", b"labels"
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
    else:
        folder, label_key = root / "cifar-100-python", b"fine_labels"
        train_files, test_files = ["train"], ["test"]
    if not folder.is_dir() and (root / train_files[0]).is_file():
        folder = root
    train = [_read_cifar_batch(folder / f, label_key) for f in train_files]
    test = [_read_cifar_batch(folder / f, label_key) for f in test_files]
    return ImageData(
        torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]),
        torch.cat([x for x, _ in test]), torch.cat([y for _, y in test]), num_classes,
    )


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # ImageFolder inputs are standardised with ImageNet's channel statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE = 256 / 224  # evaluation: resize the shorter side to image_size * 256/224, then centre-crop


@dataclass
class ImageFolderData:
    """An ImageFolder tree streamed from disk: file paths and labels in memory, images decoded batch by batch.

    Training images get torchvision's RandomResizedCrop + flip of the original image (and their view's
    photometric recipe), each from its own seed drawn from the epoch's generator, so the batches do not
    depend on how many loader processes decode them; test and probe images are resized and centre-cropped.
    """

    train_files: list[str]
    train_y: torch.Tensor
    test_files: list[str]
    test_y: torch.Tensor
    num_classes: int
    image_size: int
    workers: int = 0  # loader processes decoding images (0: decode in the calling process)

    def __post_init__(self) -> None:
        self.mean, self.std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)

    in_channels = 3

    @property
    def input_size(self) -> int:
        return self.image_size

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images to float on their device, standardised with ImageNet's channel statistics."""
        return normalize(x, *stats_on(self, x.device))

    def train_images(self, batches: list[torch.Tensor], generator: torch.Generator, use_augment: bool,
                     start: int = 0, part: Part = None,
                     recipes: tuple[Photometric, ...] = ()) -> Iterator[torch.Tensor]:
        """The uint8 training images of each index batch from batch `start` on, in order; with augmentation, each from
        a seed drawn from `generator` (the skipped batches and the rows outside `part` draw theirs too, but are not
        decoded), row block v of a batch with the photometric recipe `recipes[v]`."""
        items = []
        for idx in batches:
            seeds = torch.randint(0, 2**62, (len(idx),), generator=generator).tolist() if use_augment else [-1] * len(idx)
            block = view_block(len(idx), recipes) if recipes and use_augment else 0
            per_row = [recipes[row // block] if block else None for row in range(len(idx))]
            items.append(rows_of([FolderItem(self.train_files[i], seed, recipe)
                                  for i, seed, recipe in zip(idx.tolist(), seeds, per_row)], part))
        return self._decode(items[start:])

    def test_images(self, batch_size: int, part: Part = None) -> Iterator[torch.Tensor]:
        """The uint8 test images in order, batch by batch (only `part`'s rows), resized and centre-cropped."""
        files = self.test_files
        return self._decode([rows_of([FolderItem(f) for f in files[i : i + batch_size]], part)
                             for i in range(0, len(files), batch_size)])

    def train_images_at(self, indices: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        """The training images at `indices`, resized and centre-cropped, batch by batch."""
        files = [self.train_files[i] for i in indices.tolist()]
        return self._decode([[FolderItem(f) for f in files[i : i + batch_size]]
                             for i in range(0, len(files), batch_size)])

    def subset(self, n: int) -> ImageFolderData:
        """Only the first n training images."""
        return dataclasses.replace(self, train_files=self.train_files[:n], train_y=self.train_y[:n])

    def _decode(self, items: list[list[FolderItem]]) -> Iterator[torch.Tensor]:
        # forkserver, not fork: a stage process has zmq and OpenMP threads, and a child forked from a threaded
        # process can inherit a lock held by one of them (stage 1 hung in its first batch now and then).
        # Each loader ends with this process (exit_with), even when it is killed with SIGKILL. Its own generator: the
        # loader draws a base seed (unused: each image's augmentation has its seed) when it starts, and from torch's
        # global one that draw would shift a module's dropout stream, swapped in while the run loop draws in a thread.
        loader = torch.utils.data.DataLoader(FolderImages(self.image_size), batch_sampler=items,
                                             num_workers=self.workers,
                                             collate_fn=functools.partial(stack_images, size=self.image_size),
                                             multiprocessing_context=forkserver() if self.workers else None,
                                             worker_init_fn=functools.partial(exit_with, os.getpid()),
                                             generator=torch.Generator().manual_seed(0))
        return _one_line_errors(iter(loader))


def _one_line_errors(batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The loader's batches; a DataError raised in a loader process comes back as its own one line."""
    try:
        yield from batches
    except DataError as err:  # DataLoader re-raises it with the loader process's whole traceback in the message
        raise DataError(str(err).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None


Data = ImageData | ImageFolderData  # what batches are drawn from


def stack_images(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """A batch of decoded 3×size×size images; an empty one where a replica's part of a small batch holds no rows."""
    return torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)


class FolderItem(NamedTuple):
    """One image to decode: its file, the seed of its augmentation (-1: an evaluation image) and its view's
    photometric recipe (None: crop and flip only)."""

    path: str
    seed: int = -1
    recipe: Photometric | None = None


class FolderImages(torch.utils.data.Dataset):
    """Decodes one FolderItem to a uint8 3×S×S image: a seeded RandomResizedCrop + flip (then the photometric
    recipe, from the same seed), or (seed -1) a resize of the shorter side to S·256/224 and a centre crop."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __getitem__(self, item: FolderItem) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        path, seed, recipe = item
        try:
            with Image.open(path) as image:
                x = TF.pil_to_tensor(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            if isinstance(err, OSError) and err.errno is not None:  # the file system's: permissions, I/O, open files
                raise DataError(f"cannot read image {path} ({err.strerror})") from None
            raise DataError(f"cannot decode image {path} ({err}); remove or replace the file") from None
        size = self.image_size
        if seed < 0:
            x = TF.resize(x, [round(size * EVAL_RESIZE)], antialias=True)
            return TF.center_crop(x, [size, size])
        g = torch.Generator().manual_seed(seed)
        top, left, h, w = random_resized_box(x.shape[1], x.shape[2], g)
        x = TF.resized_crop(x, top, left, h, w, [size, size], antialias=True)
        x = x.flip(2) if torch.rand(1, generator=g).item() < 0.5 else x
        return x if recipe is None else photometric_view(x[None], recipe, g)[0]


def load_image_folder(data_dir: str | None, image_size: int, workers: int = 0) -> ImageFolderData:
    """An ImageFolder tree (DIR/train/<class>/*.JPEG, DIR/val or DIR/test likewise), listed; images are read when drawn."""
    from torchvision import datasets

    root = Path(data_dir or "data/imagefolder")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"ImageFolder data needs {root}/train and {root}/val (or test), one subfolder per class")
    try:
        train, test = datasets.ImageFolder(str(root / "train")), datasets.ImageFolder(str(test_dir))
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"ImageFolder {root}: {err}") from None
    if test.classes != train.classes:
        raise DataError(f"{test_dir} has classes {test.classes}, but {root}/train has {train.classes}")
    return ImageFolderData([p for p, _ in train.samples], torch.tensor(train.targets), [p for p, _ in test.samples],
                           torch.tensor(test.targets), len(train.classes), image_size, workers)


def synthetic_data(image_size: int, num_classes: int = 10, n_train: int = 512, n_test: int = 128) -> ImageData:
    """Random images and labels of a given shape, for benchmarks and plumbing tests."""
    g = torch.Generator().manual_seed(1234)
    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    return ImageData(
        images(n_train), torch.randint(0, num_classes, (n_train,), generator=g),
        images(n_test), torch.randint(0, num_classes, (n_test,), generator=g), num_classes,
    )


def load_data(dataset: str, data_dir: str | None = None, image_size: int = 32, train_subset: int = 0,
              loader_workers: int = 0) -> Data:
    """Load a dataset by name (see DATASETS); `train_subset` keeps only the first N training images."""
    if dataset == "fashion_mnist":
        data = load_fashion_mnist(data_dir)
    elif dataset == "digits":
        data = load_digits_data()
    elif dataset in ("cifar10", "cifar100"):
        data = load_cifar(data_dir, 10 if dataset == "cifar10" else 100)
    elif dataset == "imagefolder":
        data = load_image_folder(data_dir, image_size, loader_workers)
    elif dataset == "synthetic":
        data = synthetic_data(image_size)
    else:
        raise DataError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    _check_labels(data, dataset)
    return data.subset(train_subset) if train_subset else data


def _check_labels(data: Data, dataset: str) -> None:
    """Every label must be a class in [0, num_classes): a bad one would otherwise pass until training step 1, and fail
    there inside a stage process with an index error that does not name the data."""
    for part, y in (("train", data.train_y), ("test", data.test_y)):
        bad = torch.nonzero((y < 0) | (y >= data.num_classes))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"the {dataset} {part} set has label {int(y[i])} at index {i}, but its classes are "
                            f"0..{data.num_classes - 1}; its label files are damaged or from another dataset: "
                            "download the dataset again")


def load_config_data(cfg: Config) -> Data:
    """The data a run config names."""
    return load_data(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.train_subset, cfg.loader_workers)


# --- batches ---------------------------------------------------------------------------


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, per sample (uint8 in, uint8 out)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    cols = dx[:, None] + torch.arange(w)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = dy[:, None] + torch.arange(h)[None, :]
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # b, h, w, c
    # NCHW's own strides: with one channel, permute(...).contiguous() keeps NHWC strides, which convolutions read as
    # channels_last, and a module's output would then differ by bits from the same batch shipped between stages
    return out.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


def random_resized_box(
    h: int, w: int, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, height, width) for an h×w image, drawn from `generator` only.

    The box covers a random fraction `scale` of the image with a random aspect ratio; as in
    torchvision, ten tries, then the whole image.
    """
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        tw, th = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < tw <= w and 0 < th <= h:
            return int(u[2] * (h - th + 1)), int(u[3] * (w - tw + 1)), th, tw
    return 0, 0, h, w


def steps_per_epoch(data: Data, batch_size: int) -> int:
    """Training batches per epoch (the last partial batch is dropped)."""
    return len(data.train_y) // batch_size


@dataclass(frozen=True)
class DataShape:
    """What a pipeline stage needs to know of the data without holding it (only stage 1 draws batches)."""

    in_channels: int
    num_classes: int
    input_size: int
    steps_per_epoch: int


def data_shape(data: Data, batch_size: int) -> DataShape:
    """The shape of `data` for batches of `batch_size`."""
    return DataShape(data.in_channels, data.num_classes, data.input_size, steps_per_epoch(data, batch_size))


def train_batches(data: Data, epoch: int, batch_size: int, seed: int, use_augment: bool, start: int = 0,
                  device: torch.device | None = None, part: Part = None, views: int = 1,
                  photometric: tuple[Photometric, ...] = ()) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's shuffled, augmented, normalised training batches from batch `start` on (a resumed run skips those it
    trained on); a function of (seed, epoch) only. With `views` = 2 each batch holds every image twice, augmented
    independently: rows i and batch_size + i are two views of one image (Barlow Twins), and `photometric` may give
    each view its own colour recipe (pipeline/views.py).

    Images travel to `device` as uint8 and are normalised there (a quarter of the fp32 bytes, no host-side float
    pass); labels stay on the CPU. With `part` (a replica of stage 1), only those rows' images are decoded and
    returned, while the labels come whole: the caller takes its rows of them, and learns the batch's size.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(data.train_y), generator=g)
    batches = [order[i * batch_size : (i + 1) * batch_size].repeat(views) for i in range(steps_per_epoch(data, batch_size))]
    for idx, x in zip(batches[start:], data.train_images(batches, g, use_augment, start, part, photometric)):
        yield data.normalize(to_device(x, device)), data.train_y[idx]


def probe_batch(data: Data, size: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed probe batch of the ΔL_k analysis: the first `size` training samples, normalised on `device`, not
    augmented; labels on the CPU."""
    first = torch.arange(min(size, len(data.train_y)))
    return data.normalize(to_device(torch.cat(list(data.train_images_at(first, size))), device)), data.train_y[first]


BANK_SEED = 0  # the k-NN bank is the same training images in every run (and every evaluation) of a dataset


def bank_indices(n_train: int, size: int) -> torch.Tensor:
    """`size` training indices drawn without replacement from a fixed seed (all of them for size >= n_train, in
    order). Drawn, not the first ones: an image folder lists its files class by class."""
    if size >= n_train:
        return torch.arange(n_train)
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(BANK_SEED))[:size]


def bank_batches(data: Data, size: int, batch_size: int,
                 device: torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The k-NN bank (and the linear probe's training set): `size` training images (bank_indices), not augmented,
    normalised on `device`; labels on the CPU. No bank (size 0) starts no image loader."""
    if size <= 0:
        return
    indices = bank_indices(len(data.train_y), size)
    for i, x in enumerate(data.train_images_at(indices, batch_size)):
        yield data.normalize(to_device(x, device)), data.train_y[indices[i * batch_size : i * batch_size + len(x)]]


def eval_batches(data: Data, batch_size: int, device: torch.device | None = None,
                 part: Part = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test set in order, normalised on `device`; labels on the CPU (with `part`: that part's images, whole labels,
    as train_batches)."""
    for i, x in enumerate(data.test_images(batch_size, part)):
        yield data.normalize(to_device(x, device)), data.test_y[i * batch_size : (i + 1) * batch_size]
