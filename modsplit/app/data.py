"""Dataset loaders returning in-memory ``TensorDataset``s of (images, labels).

Every loader returns ``TensorDataset(x, y)`` with ``x`` float32 ``[N, C, H, W]`` and ``y`` int64
``[N]``. Nothing is downloaded at run time: files must already be on disk.

=============  =================  ==========================================================
name           x shape            values / source
=============  =================  ==========================================================
digits         [N, 1, 8, 8]       [0, 1]; scikit-learn's bundled 8x8 digits (no files),
                                  deterministic stratified 80/20 split (seed 0)
mnist          [N, 1, 28, 28]     [0, 1]; IDX .gz files
mnist2         [N, 1, 28, 56]     [0, 1]; two-digit MNIST, 100 classes, from the MNIST files
                                  (two real digits side by side, label 10a + b; see
                                  two_digit_mnist)
fmnist         [N, 1, 28, 28]     [0, 1]; IDX .gz files (Debian: dataset-fashion-mnist)
cifar10        [N, 3, 32, 32]     per-channel standardised; CIFAR-10 binary version (.bin)
                                  or the python version through torchvision
cifar100       [N, 3, 32, 32]     per-channel standardised; torchvision CIFAR100 layout
svhn           [N, 3, 32, 32]     per-channel standardised; torchvision SVHN layout (.mat)
imagefolder:P  [N, C, H, W]       [0, 1]; torchvision ImageFolder at path P (one folder per
                                  class, all images the same size)
=============  =================  ==========================================================

Where the files are looked for: only ``data_dir`` when it is given; else, in order,
``$MODSPLIT_DATA/<name>`` (MODSPLIT_DATA is a folder holding one sub-folder per dataset),
``./data/<name>`` (the root torchvision's examples use, relative to the working directory), and
for ``fmnist`` the folder of Debian's package dataset-fashion-mnist,
``/usr/share/datasets/fashion-mnist``.
"""
import gzip
import os
import warnings

import numpy as np
import torch
from torch.utils.data import TensorDataset

DATA_ENV = "MODSPLIT_DATA"
DATASETS = ("digits", "mnist", "mnist2", "fmnist", "cifar10", "cifar100", "svhn",
            "imagefolder:<path>")

_NUM_CLASSES = {"digits": 10, "mnist": 10, "mnist2": 100, "fmnist": 10, "cifar10": 10,
                "cifar100": 100,
                "svhn": 10}

# Per-channel training-set statistics on a 0-1 scale.
_MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

# Where torchvision's own download=True puts the raw IDX files under its root.
_TORCHVISION_RAW = {"mnist": os.path.join("MNIST", "raw"),
                    "fmnist": os.path.join("FashionMNIST", "raw")}

_HOW_TO_GET = {
    "mnist": "copy the four MNIST IDX .gz files there, or on a machine with internet run "
             "torchvision.datasets.MNIST(root, download=True) and pass data_dir=root",
    "fmnist": "install the Debian package (apt-get install -y dataset-fashion-mnist), or on a "
              "machine with internet run torchvision.datasets.FashionMNIST(root, download=True) "
              "and pass data_dir=root",
    "cifar10": "put the CIFAR-10 binary version files (data_batch_*.bin, test_batch.bin) there, "
               "or on a machine with internet run torchvision.datasets.CIFAR10(root, "
               "download=True) and pass data_dir=root",
    "cifar100": "on a machine with internet run torchvision.datasets.CIFAR100(root, "
                "download=True) and copy root here (data_dir=root)",
    "svhn": "on a machine with internet run torchvision.datasets.SVHN(root, split=..., "
            "download=True) and copy root here (data_dir=root)",
}


def num_classes(name):
    """Number of classes of dataset ``name`` (for ``imagefolder:<path>``: its class folders)."""
    if name.startswith("imagefolder:"):
        root = name.split(":", 1)[1]
        if not os.path.isdir(root):
            raise FileNotFoundError(f"imagefolder: no folder {root!r}")
        return sum(1 for e in os.scandir(root) if e.is_dir())
    if name not in _NUM_CLASSES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return _NUM_CLASSES[name]


def load_dataset(name, split="train", data_dir=None, limit=None):
    """Load dataset ``name`` ("train" or "test" split) as a ``TensorDataset(x, y)``.

    x: float32 [N, C, H, W]; y: int64 [N]. ``limit`` keeps only the first ``limit`` examples of
    the split (in file order; for ``digits`` in split order). Raises ValueError for an unknown
    name or split and FileNotFoundError (naming the folders searched and how to get the files)
    when the files are missing.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name.startswith("imagefolder:"):
        x, y = _load_imagefolder(name.split(":", 1)[1], limit)
    elif name == "digits":
        x, y = _load_digits(split, limit)
    elif name in ("mnist", "fmnist"):
        x, y = _load_idx(name, split, data_dir, limit)
    elif name == "mnist2":
        x, y = two_digit_mnist(*_load_idx("mnist", split, data_dir, None), split)
        x, y = x[:limit], y[:limit]
    elif name == "cifar10":
        x, y = _load_cifar10(split, data_dir, limit)
    elif name in ("cifar100", "svhn"):
        x, y = _load_torchvision(name, split, data_dir, limit)
    else:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return TensorDataset(x, y)


def _candidate_dirs(name, data_dir):
    """Folders to search for ``name``: just ``data_dir`` if given, else the defaults."""
    if data_dir is not None:
        return [data_dir]
    dirs = []
    if os.environ.get(DATA_ENV):
        dirs.append(os.path.join(os.environ[DATA_ENV], name))
    dirs.append(os.path.join("data", name))
    if name == "fmnist":
        dirs.append("/usr/share/datasets/fashion-mnist")
    return dirs


def _missing(name, looked):
    return FileNotFoundError(
        f"{name}: dataset files not found; looked in: {', '.join(looked)}. "
        f"To get them: {_HOW_TO_GET[name]}. Or pass data_dir (--data-dir), or set "
        f"{DATA_ENV} so that ${DATA_ENV}/{name} holds them.")


def mean_std(name):
    """The per-channel (mean, std) of ``name``'s standardisation (cifar10, cifar100, svhn), two
    tuples of C floats on a 0-1 scale."""
    return _MEAN_STD[name]


def _standardise(x_uint8_nchw, name):
    """uint8 [N, C, H, W] -> float32 [N, C, H, W], (x/255 - mean) / std per channel."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in _MEAN_STD[name])
    return (torch.from_numpy(np.ascontiguousarray(x_uint8_nchw)).float() / 255 - mean) / std


def _load_digits(split, limit):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.images, d.target, test_size=0.2,
                                              random_state=0, stratify=d.target)
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    x, y = x[:limit], y[:limit]
    return (torch.from_numpy(x).float().div_(16.0).unsqueeze(1),
            torch.from_numpy(y).long())


def _open_maybe_gz(path):
    """Open ``path`` or ``path + '.gz'`` for binary reading; None when neither exists."""
    if os.path.isfile(path + ".gz"):
        return gzip.open(path + ".gz", "rb")
    if os.path.isfile(path):
        return open(path, "rb")
    return None


def read_idx(path):
    """Read an IDX file (``path`` or ``path.gz``) into a uint8 numpy array of its header's shape.

    Only the unsigned-byte type (0x08) is supported, which is what (Fashion-)MNIST use.
    """
    f = _open_maybe_gz(path)
    if f is None:
        raise FileNotFoundError(f"no IDX file {path}[.gz]")
    with f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} bytes")
    return arr.reshape(shape)


# Seeds of the pairing permutations of two-digit MNIST, one per split.
_MNIST2_SEEDS = {"train": 20_141, "test": 20_142}


def two_digit_mnist(x, y, split):
    """Two-digit MNIST from the MNIST images x float32 [N, 1, 28, 28] and labels y int64 [N] of
    one split: example i puts image i (left, tens digit a) beside image pi(i) (right, units
    digit b), x [N, 1, 28, 56], label 10 a + b (100 classes, about N/100 examples each), where
    pi is a fixed random permutation of the split (torch.randperm under a seed per split, so
    the dataset is a function of the MNIST files alone). Every image is used once on each side;
    train and test never share an image."""
    if split not in _MNIST2_SEEDS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    pi = torch.randperm(len(y), generator=torch.Generator().manual_seed(_MNIST2_SEEDS[split]))
    return torch.cat([x, x[pi]], dim=3), 10 * y + y[pi]


def _load_idx(name, split, data_dir, limit):
    img_name, lbl_name = _IDX_FILES[split]
    looked = []
    for d in _candidate_dirs(name, data_dir):
        for folder in (d, os.path.join(d, _TORCHVISION_RAW[name])):
            looked.append(folder)
            img, lbl = os.path.join(folder, img_name), os.path.join(folder, lbl_name)
            have = [os.path.isfile(p) or os.path.isfile(p + ".gz") for p in (img, lbl)]
            if all(have):
                x, y = read_idx(img)[:limit], read_idx(lbl)[:limit]
                return (torch.from_numpy(x.copy()).float().div_(255.0).unsqueeze(1),
                        torch.from_numpy(y.astype(np.int64)))
    raise _missing(name, looked)


def _read_cifar_bin(paths, limit):
    """Records of CIFAR-10 binary files -> (uint8 [N, 3, 32, 32], int64 [N])."""
    chunks, left = [], limit
    for p in paths:
        if left is not None and left <= 0:
            break
        count = -1 if left is None else left * 3073
        r = np.fromfile(p, dtype=np.uint8, count=count)
        if r.size % 3073:
            raise ValueError(f"{p}: size {r.size} is not a multiple of a 3073-byte record")
        r = r.reshape(-1, 3073)
        chunks.append(r)
        if left is not None:
            left -= len(r)
    r = np.concatenate(chunks)
    return r[:, 1:].reshape(-1, 3, 32, 32), r[:, 0].astype(np.int64)


def _cifar10_bin_files(folder, split):
    """CIFAR-10 binary files for ``split`` in ``folder`` (sorted), or [] if none."""
    if not os.path.isdir(folder):
        return []
    names = sorted(os.listdir(folder))
    prefix = "data_batch_" if split == "train" else "test_batch"
    return [os.path.join(folder, n) for n in names if n.startswith(prefix) and n.endswith(".bin")]


def _load_cifar10(split, data_dir, limit):
    looked = []
    for d in _candidate_dirs("cifar10", data_dir):
        folders = [d, os.path.join(d, "cifar-10-batches-bin")]
        if split == "test":
            folders.append(os.path.join(d, "partial-test-bin"))
        for folder in folders:
            looked.append(folder)
            files = _cifar10_bin_files(folder, split)
            if files:
                if split == "test" and "test_batch.bin" not in map(os.path.basename, files):
                    warnings.warn(f"cifar10: using a partial test set ({', '.join(files)}), "
                                  f"not the full 10,000-image test_batch.bin", stacklevel=3)
                x, y = _read_cifar_bin(files, limit)
                return _standardise(x, "cifar10"), torch.from_numpy(y)
        if os.path.isdir(os.path.join(d, "cifar-10-batches-py")):
            return _load_torchvision("cifar10", split, d, limit)
        looked.append(os.path.join(d, "cifar-10-batches-py"))
    raise _missing("cifar10", looked)


def _load_torchvision(name, split, data_dir, limit):
    """cifar10 (python version), cifar100, svhn through torchvision classes, download=False."""
    from torchvision import datasets

    looked = []
    for d in _candidate_dirs(name, data_dir):
        looked.append(d)
        if not os.path.isdir(d):
            continue
        try:
            if name == "svhn":
                ds = datasets.SVHN(d, split=split, download=False)
                x, y = ds.data, np.asarray(ds.labels)  # data: uint8 [N, 3, 32, 32]
            else:
                cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
                ds = cls(d, train=(split == "train"), download=False)
                x, y = ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets)  # NHWC -> NCHW
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            continue
        return _standardise(x[:limit], name), torch.from_numpy(y[:limit].astype(np.int64))
    raise _missing(name, looked)


def _load_imagefolder(root, limit):
    from torchvision import datasets, transforms

    if not os.path.isdir(root):
        raise FileNotFoundError(f"imagefolder: no folder {root!r} (expected one sub-folder of "
                                f"images per class)")
    ds = datasets.ImageFolder(root, transform=transforms.ToTensor())
    n = len(ds) if limit is None else min(limit, len(ds))
    xs, ys = zip(*(ds[i] for i in range(n)))
    if len({t.shape for t in xs}) > 1:
        raise ValueError(f"imagefolder {root!r}: images differ in size "
                         f"({sorted({tuple(t.shape) for t in xs})[:3]}...); resize them first")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
