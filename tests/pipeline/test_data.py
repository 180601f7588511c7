import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import (
    HISTOGRAM_CHUNK, DataError, FolderImages, augment, bank_batches, bank_indices, channel_statistics, eval_batches,
    load_data, normalize, pixels, probe_batch, random_resized_box, read_idx, steps_per_epoch, train_batches,
)
from pipeline.views import PHOTOMETRIC


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def write_fashion_fixture(folder, n_train=40, n_test=10, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz)
    return arrays


@pytest.mark.parametrize("layout,gz", [("", True), ("FashionMNIST/raw", False)])
def test_fashion_mnist_from_idx_files_in_either_layout(tmp_path, layout, gz):
    arrays = write_fashion_fixture(tmp_path / layout if layout else tmp_path, gz=gz)
    data = load_data("fashion_mnist", str(tmp_path))
    assert data.train_x.shape == (40, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert torch.equal(data.train_x[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8)))
    assert data.test_y.tolist() == list(range(10))
    assert data.num_classes == 10 and data.in_channels == 1 and data.input_size == 28


@pytest.mark.parametrize("case", ["uniform", "skewed", "constant", "digits", "longer than a chunk", "channels last",
                                  "strided"])
def test_channel_statistics_equal_numpys_float64_mean_and_std_to_the_bit(case):
    """The statistics every normalised batch uses: the same float32 bits as numpy's float64 mean and std of a float
    copy of the images, which they replaced (so every earlier run normalises as before)."""
    g = torch.Generator().manual_seed(0)
    images = {"uniform": lambda: torch.randint(0, 256, (2000, 3, 8, 8), generator=g, dtype=torch.uint8),
              "skewed": lambda: (torch.rand(3000, 3, 8, 8, generator=g) ** 4 * 255).to(torch.uint8),
              "constant": lambda: torch.full((10, 2, 4, 4), 7, dtype=torch.uint8),
              "digits": lambda: load_data("digits").train_x,
              "longer than a chunk": lambda: torch.randint(0, 256, (HISTOGRAM_CHUNK // 64 + 3, 1, 8, 8), generator=g,
                                                           dtype=torch.uint8),
              "channels last": lambda: torch.randint(0, 256, (500, 3, 8, 8), generator=g, dtype=torch.uint8).contiguous(
                  memory_format=torch.channels_last),
              "strided": lambda: torch.randint(0, 256, (900, 3, 9, 9), generator=g, dtype=torch.uint8)[::3, :, 1:, ::2]
              }[case]()
    floats = images.transpose(0, 1).reshape(images.shape[1], -1).numpy().astype(np.float64) / 255
    mean, std = channel_statistics(images)
    assert torch.equal(mean, torch.from_numpy(floats.mean(axis=1)).float())
    assert torch.equal(std, torch.from_numpy(floats.std(axis=1, ddof=1)).float().clamp_min(1e-3))


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion_mnist", str(tmp_path))


def test_truncated_idx_file_is_an_error(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 3), dtype=np.uint8), gz=False)
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "x")


def test_a_damaged_gz_file_is_a_one_line_error(tmp_path):
    write_fashion_fixture(tmp_path)
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-20])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is a damaged gzip file") as err:
        load_data("fashion_mnist", str(tmp_path))
    assert "\n" not in str(err.value)


def test_a_labels_file_shorter_than_its_images_is_an_error(tmp_path):
    write_fashion_fixture(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(30) % 10, gz=True)
    with pytest.raises(DataError, match="the train set has 40 images but 30 labels"):
        load_data("fashion_mnist", str(tmp_path))


def write_cifar_fixture(root, classes):
    rng = np.random.default_rng(1)
    if classes == 10:
        folder, label_key = root / "cifar-10-batches-py", b"labels"
        files = {f"data_batch_{i}": 6 for i in range(1, 6)} | {"test_batch": 4}
    else:
        folder, label_key = root / "cifar-100-python", b"fine_labels"
        files = {"train": 12, "test": 4}
    folder.mkdir(parents=True)
    for name, n in files.items():
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), label_key: [int(v) for v in rng.integers(0, classes, n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_python_format(tmp_path, classes):
    folder = write_cifar_fixture(tmp_path, classes)
    data = load_data(f"cifar{classes}", str(tmp_path))
    n_train = 30 if classes == 10 else 12
    assert data.train_x.shape == (n_train, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    first = pickle.loads((folder / ("data_batch_1" if classes == 10 else "train")).read_bytes())
    assert torch.equal(data.train_x[0], torch.from_numpy(first[b"data"][0].reshape(3, 32, 32)))
    assert data.num_classes == classes


def test_cifar_reader_refuses_pickles_that_are_not_arrays(tmp_path):
    folder = write_cifar_fixture(tmp_path, 10)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="refusing to unpickle .*print"):
        load_data("cifar10", str(tmp_path))


def cifar_batch(n=6, **entries):
    """The bytes of a CIFAR-10 batch of n images, with `entries` replacing or (None) removing its own."""
    batch = {b"data": np.zeros((n, 3072), dtype=np.uint8), b"labels": [0] * n}
    batch.update({key.encode(): value for key, value in entries.items()})
    return pickle.dumps({k: v for k, v in batch.items() if v is not None}, protocol=2)


@pytest.mark.parametrize("content,why", [
    (b"", "(EOFError: Ran out of input)"),
    (b"\x00 garbage, not a pickle", "(UnpicklingError: invalid load key, '\\x00'.)"),
    (cifar_batch()[:-40], "(EOFError: Ran out of input)"),
    (cifar_batch(data=None), "(it has no b'data' entry)"),
    (cifar_batch(labels=None), "(it has no b'labels' entry)"),
    (cifar_batch(data=np.zeros((6, 3000), dtype=np.uint8)),
     "(its b'data' is a uint8 array of shape (6, 3000), not rows of 3×32×32 = 3072 bytes)"),
    (cifar_batch(labels=[0.5] * 6), "(its b'labels' is not a list of integers)"),
    (cifar_batch(labels=[0] * 5), "(it has 6 images but 5 labels)"),
    (pickle.dumps([np.zeros((6, 3072), dtype=np.uint8), [0] * 6], protocol=2), "(it holds a list, not a dict)"),
], ids=["zero_bytes", "garbage", "truncated", "no_data", "no_labels", "wrong_size", "float_labels", "short_labels",
        "a_list"])
def test_a_damaged_cifar_batch_is_named_in_one_line(tmp_path, content, why):
    folder = write_cifar_fixture(tmp_path, 10)
    (folder / "data_batch_2").write_bytes(content)
    with pytest.raises(DataError) as err:
        load_data("cifar10", str(tmp_path))
    assert str(err.value) == f"{folder / 'data_batch_2'} is not a CIFAR python batch {why}; download the dataset again"


def test_an_unreadable_cifar_batch_is_named_in_one_line(tmp_path, monkeypatch):
    folder = write_cifar_fixture(tmp_path, 10)
    read_bytes = Path.read_bytes

    def refuse(path: Path) -> bytes:  # as chmod 000 would (the tests may run as root, whom chmod does not stop)
        if path.name == "data_batch_2":
            raise PermissionError(13, "Permission denied")
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(DataError, match=f"^cannot read CIFAR file {folder / 'data_batch_2'} \\(Permission denied\\)"):
        load_data("cifar10", str(tmp_path))


@pytest.mark.parametrize("label", [99, -1])
def test_a_cifar_label_outside_the_classes_is_refused_at_load(tmp_path, label):
    folder = write_cifar_fixture(tmp_path, 10)
    (folder / "test_batch").write_bytes(cifar_batch(4, labels=[3, 1, label, 7]))
    with pytest.raises(DataError) as err:
        load_data("cifar10", str(tmp_path))
    assert str(err.value) == (f"the cifar10 test set has label {label} at index 2, but its classes are 0..9; its label "
                              "files are damaged or from another dataset: download the dataset again")


def test_a_fashion_mnist_label_outside_the_classes_is_refused_at_load(tmp_path):
    write_fashion_fixture(tmp_path)
    labels = np.arange(40) % 10
    labels[13] = 200
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz=True)
    with pytest.raises(DataError, match=r"^the fashion_mnist train set has label 200 at index 13, but its classes"):
        load_data("fashion_mnist", str(tmp_path), train_subset=5)  # checked before the subset drops it


def test_missing_cifar_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match="cs.toronto.edu"):
        load_data("cifar10", str(tmp_path))


def test_image_folder_is_listed_not_decoded(tmp_path):
    write_image_folder(tmp_path)
    data = load_data("imagefolder", str(tmp_path), image_size=16)
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1] and data.num_classes == 2 and len(data.test_y) == 6
    assert not any(torch.is_tensor(v) and v.dtype == torch.uint8 for v in vars(data).values())  # no pixels held
    assert (data.in_channels, data.input_size) == (3, 16)
    assert [x.shape for x in data.test_images(4)] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert load_data("imagefolder", str(tmp_path), image_size=16, train_subset=2).train_files == data.train_files[:2]


def test_the_digits_read_directly_are_scikit_learns():
    from sklearn.datasets import load_digits

    digits, data = load_digits(), load_data("digits")
    images = torch.cat([data.train_x, data.test_x])[:, 0]
    labels = torch.cat([data.train_y, data.test_y])
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))
    order = torch.cat([order[359:], order[:359]])  # train, then test
    assert torch.equal(images, torch.from_numpy(np.clip(digits.images * 16, 0, 255).astype(np.uint8))[order])
    assert torch.equal(labels, torch.from_numpy(digits.target).long()[order])


def test_digits_and_synthetic():
    digits = load_data("digits", train_subset=100)
    assert digits.train_x.shape == (100, 1, 8, 8) and len(digits.test_y) == 359
    assert digits.train_x.max() > 200  # 0..16 scaled to bytes
    synth = load_data("synthetic", image_size=12)
    assert synth.train_x.shape[1:] == (3, 12, 12)
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_data("mnist")


def test_batches_depend_only_on_seed_and_epoch():
    data = load_data("digits")
    a = list(train_batches(data, 3, 64, seed=5, use_augment=True))
    b = list(train_batches(data, 3, 64, seed=5, use_augment=True))
    c = list(train_batches(data, 4, 64, seed=5, use_augment=True))
    assert len(a) == steps_per_epoch(data, 64) == len(data.train_y) // 64
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    x, _ = a[0]
    assert x.dtype == torch.float32 and x.shape == (64, 1, 8, 8)
    assert sum(len(y) for _, y in eval_batches(data, 100)) == len(data.test_y)


def test_two_views_hold_each_image_twice_augmented_independently():
    data = load_data("digits")
    x, y = next(train_batches(data, 0, 32, seed=5, use_augment=True, views=2))
    assert x.shape[0] == 64 and torch.equal(y[:32], y[32:])  # rows i and 32 + i: one image's two views
    assert not torch.equal(x[:32], x[32:])  # each view its own crop and flip
    plain, _ = next(train_batches(data, 0, 32, seed=5, use_augment=False, views=2))
    assert torch.equal(plain[:32], plain[32:])  # without augmentation the two views would be one image
    assert len(list(train_batches(data, 0, 32, seed=5, use_augment=True, views=2))) == steps_per_epoch(data, 32)


def test_normalising_divides_by_255_exactly_as_a_gpu_then_does():
    # tests/gpu checks the GPU's batches against these bits: there, a division by the Python number 255 would be a
    # product with its reciprocal, one bit off for about half of the byte values
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(2, 3, 1, 1)
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.3, 0.2, 0.1])
    exact = (x.float() / 255 - mean[None, :, None, None]) / std[None, :, None, None]
    assert torch.equal(normalize(x, mean, std), exact)
    assert not torch.equal(x.float() * (1 / 255), x.float() / 255)  # the product really is another number


def test_barlow_twins_photometric_views_are_drawn_from_the_epoch_generator_alone():
    data = load_data("digits")
    views = PHOTOMETRIC["barlow_twins"]
    a, b = (list(train_batches(data, 1, 32, seed=5, use_augment=True, views=2, photometric=views)) for _ in range(2))
    plain = list(train_batches(data, 1, 32, seed=5, use_augment=True, views=2))
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    assert not torch.equal(a[0][0], plain[0][0])  # the first view is always blurred
    assert torch.equal(a[0][1], plain[0][1])  # the same images, in the same order
    resumed = list(train_batches(data, 1, 32, seed=5, use_augment=True, start=2, views=2, photometric=views))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a[2:], resumed))


def test_bank_batches_are_fixed_drawn_training_images_unaugmented_with_their_labels():
    data = load_data("digits")
    batches = list(bank_batches(data, 70, 32))
    indices = bank_indices(len(data.train_y), 70)
    assert [len(y) for _, y in batches] == [32, 32, 6] and len(set(indices.tolist())) == 70
    assert not torch.equal(indices, torch.arange(70))  # drawn: an image folder lists its files class by class
    assert torch.equal(torch.cat([x for x, _ in batches]), data.normalize(data.train_x[indices]))
    assert torch.equal(torch.cat([y for _, y in batches]), data.train_y[indices])
    assert torch.equal(bank_indices(len(data.train_y), 70), indices)  # the same bank in every evaluation
    assert torch.equal(bank_indices(50, 80), torch.arange(50)) and list(bank_batches(data, 0, 32)) == []


def test_normalisation_standardises_the_train_set():
    data = load_data("digits")
    x = data.normalize(data.train_x)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2


def test_pixels_gives_back_the_uint8_images_a_batch_was_normalised_from():
    data = load_data("digits")
    u = torch.randint(0, 256, (64, *data.train_x.shape[1:]), dtype=torch.uint8)
    assert torch.equal(pixels(data.normalize(u), data.mean, data.std), u)


def test_augment_is_a_crop_and_flip_of_the_original():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).reshape(2, 1, 6, 6)
    out = augment(x, g, pad=0)  # no padding: only flips remain
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    padded = augment(x, torch.Generator().manual_seed(1), pad=2)
    assert padded.shape == x.shape
    # every non-zero value of a crop comes from the same image
    for i in range(2):
        values = set(padded[i].flatten().tolist()) - {0}
        assert values <= set(x[i].flatten().tolist())
    # NCHW strides even with one channel: NHWC strides would make convolutions take their channels_last kernels, whose
    # bits differ from those of the same batch after a trip between pipeline stages (which makes it NCHW)
    assert padded.stride() == (36, 36, 6, 1)


def write_image_folder(root, sizes=((40, 30), (30, 40), (36, 36))) -> None:
    """A two-class ImageFolder of real JPEG and PNG files of different shapes."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for i, (h, w) in enumerate(sizes):
                image = Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8))
                image.save(root / split / cls / f"{i}.{'jpg' if i % 2 else 'png'}")


def test_image_folder_batches_do_not_depend_on_the_loader_processes(tmp_path):
    write_image_folder(tmp_path)
    data = load_data("imagefolder", str(tmp_path), image_size=16)
    a = list(train_batches(data, 1, 3, seed=7, use_augment=True))
    b = list(train_batches(load_data("imagefolder", str(tmp_path), image_size=16, loader_workers=2), 1, 3, seed=7,
                           use_augment=True))
    assert len(a) == 2 and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], next(train_batches(data, 2, 3, seed=7, use_augment=True))[0])  # a new epoch
    views = PHOTOMETRIC["barlow_twins"]
    c, d = (list(train_batches(load_data("imagefolder", str(tmp_path), image_size=16, loader_workers=workers), 1, 3,
                               seed=7, use_augment=True, views=2, photometric=views)) for workers in (0, 2))
    assert all(torch.equal(xc, xd) for (xc, _), (xd, _) in zip(c, d))
    two = list(train_batches(data, 1, 3, seed=7, use_augment=True, views=2))
    assert torch.equal(c[0][1], two[0][1]) and not torch.equal(c[0][0][:3], two[0][0][:3])  # view 1: always blurred


@pytest.mark.parametrize("source", ["digits", "imagefolder"])
def test_drawing_batches_never_touches_the_global_random_stream(tmp_path, source):
    # the run loop draws batches in a thread while a module's step has swapped its own dropout stream into torch's
    # global generator (StageStep's own_rng): a draw from it there would shift that stream
    write_image_folder(tmp_path)
    data = load_data(source, str(tmp_path), image_size=16)
    before = torch.get_rng_state()
    for batches in (train_batches(data, 1, 3, seed=7, use_augment=True), eval_batches(data, 5),
                    bank_batches(data, 4, 3)):
        assert list(batches)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("source", ["digits", "imagefolder"])
def test_a_part_of_each_batch_decodes_those_rows_only_and_keeps_the_labels_whole(tmp_path, source):
    write_image_folder(tmp_path)
    data = load_data(source, str(tmp_path), image_size=16)
    last_of_two = lambda n: (n // 2, n)  # noqa: E731 - what workers.routes.shard(n, 2, 1) gives
    for whole, half in ((list(train_batches(data, 1, 3, seed=7, use_augment=True)),
                         list(train_batches(data, 1, 3, seed=7, use_augment=True, part=last_of_two))),
                        (list(eval_batches(data, 5)), list(eval_batches(data, 5, part=last_of_two)))):
        assert len(whole) == len(half)
        for (x, y), (x_part, y_all) in zip(whole, half):  # the same augmentation draws: rows before ours drew theirs
            assert torch.equal(x_part, x[len(y) // 2:]) and torch.equal(y_all, y)
    nothing = list(eval_batches(data, 5, part=lambda n: (n, n)))  # a replica's part of a batch smaller than the count
    assert nothing and all(x.shape[0] == 0 and x.dtype == torch.float32 for x, _ in nothing)


def test_image_folder_augments_training_crops_and_centre_crops_the_rest(tmp_path):
    write_image_folder(tmp_path)
    data = load_data("imagefolder", str(tmp_path), image_size=16)
    plain = next(train_batches(data, 0, 6, seed=7, use_augment=False))
    crops = next(train_batches(data, 0, 6, seed=7, use_augment=True))
    assert plain[0].shape == crops[0].shape == (6, 3, 16, 16) and torch.equal(plain[1], crops[1])
    assert not torch.equal(plain[0], crops[0])
    order = torch.randperm(6, generator=torch.Generator().manual_seed(7 * 1_000_003))
    probe_x, probe_y = probe_batch(data, 6)  # the probe: the first images, resized and centre-cropped
    assert torch.equal(plain[0], probe_x[order]) and torch.equal(plain[1], probe_y[order])


def test_random_resized_box_follows_torchvision_rules():
    assert random_resized_box(12, 12, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (0, 0, 12, 12)
    g = torch.Generator().manual_seed(0)
    for h, w in ((300, 200), (64, 64), (50, 400)):
        for _ in range(50):
            top, left, bh, bw = random_resized_box(h, w, g)
            assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
            assert (bh, bw) == (h, w) or (0.07 <= bh * bw / (h * w) <= 1.0 and 0.7 <= bw / bh <= 1.4)
    first = [random_resized_box(300, 200, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert first[0] == first[1]


def test_a_resumed_epoch_starts_mid_way_with_the_same_batches_and_decodes_only_those(tmp_path, monkeypatch):
    write_image_folder(tmp_path)
    for data in (load_data("digits", train_subset=300), load_data("imagefolder", str(tmp_path), image_size=16)):
        full = list(train_batches(data, 2, 2, seed=3, use_augment=True))
        tail = list(train_batches(data, 2, 2, seed=3, use_augment=True, start=1))
        assert len(tail) == len(full) - 1
        assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(full[1:], tail))
    decoded = []
    original = FolderImages.__getitem__
    monkeypatch.setattr(FolderImages, "__getitem__", lambda self, item: decoded.append(item) or original(self, item))
    list(train_batches(data, 2, 2, seed=3, use_augment=True, start=2))
    assert len(decoded) == 2  # only the last batch of the three


def test_images_travel_as_uint8_and_are_normalised_where_they_land(monkeypatch):
    import pipeline.data as data_module

    data = load_data("digits")
    moved = []
    real = data_module.to_device
    monkeypatch.setattr(data_module, "to_device", lambda t, device: moved.append(t) or real(t, device))
    cpu = torch.device("cpu")
    batches = list(train_batches(data, 1, 64, seed=5, use_augment=True, device=cpu))
    first_eval = next(eval_batches(data, 100, cpu))
    probe = probe_batch(data, 16, cpu)
    assert len(moved) == len(batches) + 2 and all(t.dtype == torch.uint8 for t in moved)  # a quarter of fp32's bytes
    # the numbers are the old path's: the uint8 images normalised on the host, then moved as floats
    mean, std = data.mean[None, :, None, None], data.std[None, :, None, None]
    for (x, _), images in zip([*batches, first_eval, probe], moved):
        assert torch.equal(x, (images.float() / 255 - mean) / std)
    assert torch.equal(moved[-2], data.test_x[:100]) and torch.equal(moved[-1], data.train_x[:16])
    monkeypatch.undo()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, train_batches(data, 1, 64, seed=5, use_augment=True)))


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_that_will_not_decode_is_named_in_one_line(tmp_path, workers):
    write_image_folder(tmp_path)
    broken = tmp_path / "train" / "bee" / "1.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    data = load_data("imagefolder", str(tmp_path), image_size=16, loader_workers=workers)
    with pytest.raises(DataError) as err:
        list(train_batches(data, 0, 3, seed=7, use_augment=True))
    assert str(err.value).startswith(f"cannot decode image {broken} (") and "\n" not in str(err.value)
    assert str(err.value).endswith("; remove or replace the file")
