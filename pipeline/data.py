"""Datasets held in memory as uint8 images, and deterministic batches drawn from them.

Every source (Fashion-MNIST idx files, scikit-learn digits, CIFAR python batches, an
ImageFolder tree, synthetic noise) becomes the same `ImageData`. Batches depend only on
(seed, epoch), so a run, a resumed run and a pipeline's first stage all see the same ones.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion_mnist", "digits", "cifar10", "cifar100", "imagefolder", "synthetic")
LOADER_WORKERS_FROM = 4096  # ImageFolder splits of at least this many images are decoded by several processes


class DataError(RuntimeError):
    """Data that is missing or malformed; the message says how to get it right."""


@dataclass
class ImageData:
    """Train and test images (uint8, N×C×H×W) with labels, and the train set's channel statistics."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    crop: str = "pad"  # training augmentation's crop: pad (pad 4, random crop) or resized (RandomResizedCrop)

    def __post_init__(self) -> None:
        # numpy in float64: the statistics must not depend on the torch thread count, or processes
        # with different thread counts would normalise the same images to different bits.
        pixels = self.train_x.transpose(0, 1).reshape(self.train_x.shape[1], -1).numpy().astype(np.float64) / 255
        self.mean = torch.from_numpy(pixels.mean(axis=1)).float()
        self.std = torch.from_numpy(pixels.std(axis=1, ddof=1)).float().clamp_min(1e-3)

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def input_size(self) -> int:
        return self.train_x.shape[2]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images to float, standardised per channel with the train set's statistics."""
        x = x.float().div_(255)
        return (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]


# --- readers -------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (MNIST format, optionally gzipped) into a numpy array."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
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
    """scikit-learn's bundled 8×8 digits (1797 images), split by a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.clip(digits.images * 16, 0, 255).astype(np.uint8))[:, None]
    labels = torch.from_numpy(digits.target).long()
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
            raise DataError(f"refusing to unpickle {module}.{name}: not a CIFAR python batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise DataError(
            f"CIFAR file {path} not found; download the python version from "
            "https://www.cs.toronto.edu/~kriz/cifar.html and set data_dir to the folder that holds it"
        )
    batch = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(data.copy()), torch.tensor(batch[label_key], dtype=torch.long)


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


def load_image_folder(data_dir: str | None, image_size: int) -> ImageData:
    """An ImageFolder tree (DIR/train/<class>/*.png, DIR/val or DIR/test likewise), resized into memory.

    Every image is resized (shorter side) and centre-cropped to image_size and kept as uint8:
    N x 3 x image_size^2 bytes per process, so ImageNet-1k's train set (1.28M images) needs 193 GB at
    224 and 63 GB at 128. Training batches augment with RandomResizedCrop + flip (crop='resized').
    Large folders are decoded by several loader processes.
    """
    from torchvision import datasets, transforms

    root = Path(data_dir or "data/imagefolder")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"ImageFolder data needs {root}/train and {root}/val (or test), one subfolder per class")
    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.PILToTensor()])

    def stack(folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        ds = datasets.ImageFolder(str(folder), transform=lambda im: tf(im.convert("RGB")))
        workers = min(8, os.cpu_count() or 1) if len(ds) >= LOADER_WORKERS_FROM else 0
        loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=workers)
        xs, ys = zip(*loader)
        return torch.cat(xs), torch.cat(ys), ds.classes

    train_x, train_y, classes = stack(root / "train")
    test_x, test_y, test_classes = stack(test_dir)
    if test_classes != classes:
        raise DataError(f"{test_dir} has classes {test_classes}, but {root}/train has {classes}")
    return ImageData(train_x, train_y, test_x, test_y, len(classes), crop="resized")


def synthetic_data(image_size: int, num_classes: int = 10, n_train: int = 512, n_test: int = 128) -> ImageData:
    """Random images and labels of a given shape, for benchmarks and plumbing tests."""
    g = torch.Generator().manual_seed(1234)
    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    return ImageData(
        images(n_train), torch.randint(0, num_classes, (n_train,), generator=g),
        images(n_test), torch.randint(0, num_classes, (n_test,), generator=g), num_classes,
    )


def load_data(dataset: str, data_dir: str | None = None, image_size: int = 32, train_subset: int = 0) -> ImageData:
    """Load a dataset by name (see DATASETS); `train_subset` keeps only the first N training images."""
    if dataset == "fashion_mnist":
        data = load_fashion_mnist(data_dir)
    elif dataset == "digits":
        data = load_digits_data()
    elif dataset in ("cifar10", "cifar100"):
        data = load_cifar(data_dir, 10 if dataset == "cifar10" else 100)
    elif dataset == "imagefolder":
        data = load_image_folder(data_dir, image_size)
    elif dataset == "synthetic":
        data = synthetic_data(image_size)
    else:
        raise DataError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    if train_subset:
        data = ImageData(data.train_x[:train_subset], data.train_y[:train_subset], data.test_x, data.test_y,
                         data.num_classes, data.crop)
    return data


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
    return out.permute(0, 3, 1, 2).contiguous()


def random_resized_crop(
    x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """torchvision's RandomResizedCrop + horizontal flip per sample, back to the same size (uint8 in, uint8 out).

    Each crop covers a random fraction `scale` of the image with a random aspect ratio; as in
    torchvision, ten tries, then the whole image. The randomness comes from `generator` only.
    """
    from torchvision.transforms.v2 import functional as TF

    b, _, h, w = x.shape
    out = torch.empty_like(x)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for n in range(b):
        top, left, ch, cw = 0, 0, h, w
        for _ in range(10):
            u = torch.rand(4, generator=generator).tolist()
            area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
            tw, th = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < tw <= w and 0 < th <= h:
                top, left, ch, cw = int(u[2] * (h - th + 1)), int(u[3] * (w - tw + 1)), th, tw
                break
        out[n] = TF.resized_crop(x[n], top, left, ch, cw, [h, w], antialias=True)
    flip = torch.rand(b, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def steps_per_epoch(data: ImageData, batch_size: int) -> int:
    """Training batches per epoch (the last partial batch is dropped)."""
    return len(data.train_y) // batch_size


def train_batches(data: ImageData, epoch: int, batch_size: int, seed: int, use_augment: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's shuffled, augmented, normalised training batches; a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(data.train_y), generator=g)
    for i in range(steps_per_epoch(data, batch_size)):
        idx = order[i * batch_size : (i + 1) * batch_size]
        x = data.train_x[idx]
        if use_augment:
            x = augment(x, g) if data.crop == "pad" else random_resized_crop(x, g)
        yield data.normalize(x), data.train_y[idx]


def probe_batch(data: ImageData, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed probe batch of the ΔL_k analysis: the first `size` training samples, normalised, not augmented."""
    return data.normalize(data.train_x[:size]), data.train_y[:size]


def eval_batches(data: ImageData, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test set in order, normalised."""
    for i in range(0, len(data.test_y), batch_size):
        yield data.normalize(data.test_x[i : i + batch_size]), data.test_y[i : i + batch_size]
