"""The datasets the pipeline reads, each fact in one place: official file names and
checksums, mirrors, class names, image shape and polarity. `data.name` in params.yaml picks
one; `idx` describes any other set in the MNIST file layout (see params.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RESIZE_MARGIN = 4      # px: a resized recipe's `size` px are a random (training) or centre crop of size + 4
RESIZED_SIDE = 32      # px: the one resized input a recipe may ask for (CIFAR-sized models)
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"


@dataclass(frozen=True)
class Checksum:
    """How a file is verified: `sha256` of its (decompressed) content, or, where only the
    archive's digest is published, `md5_gz` of the official .gz as distributed."""

    sha256: str = ""
    md5: str = ""        # of the content (CIFAR-10's batch files)
    md5_gz: str = ""     # of the official .gz file (MNIST, KMNIST)


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: tuple[str, ...]
    shape: tuple[int, int, int]          # C, H, W of each stored image (uint8)
    layout: Literal["idx", "cifar-10"]   # the official file format
    files: dict[str, Checksum]           # official file name -> checksum ({} = structure checks only)
    title: str = ""                      # the name figures print ("" = `name`)
    mirrors: tuple[str, ...] = ()        # directories or URL bases holding the official files
    archive: str = ""                    # a tarball the files come in (CIFAR-10), name under each mirror
    archive_md5: str = ""
    light_on_dark: bool = True           # bright subject on a black background (MNIST style)
    train_images: int = 0                # 0 = not known before reading (an `idx` set)
    test_images: int = 0

    @property
    def display_name(self) -> str:
        return self.title or self.name

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def side(self) -> int:
        return self.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def pixels(self) -> int:
        return self.shape[1] * self.shape[2]

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """One image as the arrays hold it: (H, W) grey, (H, W, C) colour (as decoded images are)."""
        return self.shape[1:] if self.channels == 1 else (*self.shape[1:], self.channels)

    def input_sizes(self) -> tuple[int, ...]:
        """Sides a recipe may train at: as stored, or resized to 32 px."""
        return tuple(sorted({self.side, RESIZED_SIDE}))


DIGITS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")

DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset(
        "fashion-mnist",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        (1, 28, 28), "idx",
        # SHA-256 of each file's decompressed content. Mirrors recompress the .gz files (the
        # Debian package's bytes differ from the official ones); the content never changes.
        {"train-images-idx3-ubyte": Checksum("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
         "train-labels-idx1-ubyte": Checksum("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
         "t10k-images-idx3-ubyte": Checksum("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
         "t10k-labels-idx1-ubyte": Checksum("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34")},
        "Fashion-MNIST", ("/usr/share/datasets/fashion-mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"),
        train_images=60_000, test_images=10_000),
    Dataset(
        "mnist", DIGITS, (1, 28, 28), "idx",
        # MNIST publishes no content digest; these are the MD5s of the official .gz files.
        {"train-images-idx3-ubyte": Checksum(md5_gz="f68b3c2dcbeaaa9fbdd348bbdeb94873"),
         "train-labels-idx1-ubyte": Checksum(md5_gz="d53e105ee54ea40749a09fcbcd1e9432"),
         "t10k-images-idx3-ubyte": Checksum(md5_gz="9fb629c4189551a2d022fa330f9573f3"),
         "t10k-labels-idx1-ubyte": Checksum(md5_gz="ec29112dd5afa0611ce80d1b7f02629c")},
        "MNIST", ("https://ossci-datasets.s3.amazonaws.com/mnist", "http://yann.lecun.com/exdb/mnist"),
        train_images=60_000, test_images=10_000),
    Dataset(
        "kmnist", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"), (1, 28, 28), "idx",
        {"train-images-idx3-ubyte": Checksum(md5_gz="bdb82020997e1d708af4cf47b453dcf7"),
         "train-labels-idx1-ubyte": Checksum(md5_gz="e144d726b3acfaa3e44228e80efcd344"),
         "t10k-images-idx3-ubyte": Checksum(md5_gz="5c965bf0a639b31b8f53240b1b52f4d7"),
         "t10k-labels-idx1-ubyte": Checksum(md5_gz="7320c461ea6c1c855c0b718fb2a4b134")},
        "Kuzushiji-MNIST", ("http://codh.rois.ac.jp/kmnist/dataset/kmnist",),
        train_images=60_000, test_images=10_000),
    Dataset(
        "cifar-10",
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        (3, 32, 32), "cifar-10",
        # The MD5s of the batch files inside cifar-10-python.tar.gz (cifar-10-batches-py/).
        {"data_batch_1": Checksum(md5="c99cafc152244af753f735de768cd75f"),
         "data_batch_2": Checksum(md5="d4bba439e000b95fd0a9bffe97cbabec"),
         "data_batch_3": Checksum(md5="54ebc095f3ab1f0389bbae665268c751"),
         "data_batch_4": Checksum(md5="634d18415352ddfa80567beed471001a"),
         "data_batch_5": Checksum(md5="482c414d41f54cd18b22e5b47cb7c3cb"),
         "test_batch": Checksum(md5="40351d587109b95175f43aff81a1287e"),
         "batches.meta": Checksum(md5="5ff9c542aee3614f3951f8cda6e48888")},
        "CIFAR-10", ("https://www.cs.toronto.edu/~kriz",),
        archive="cifar-10-python.tar.gz", archive_md5="c58f30108f718f92721af3b95e74349a",
        light_on_dark=False, train_images=50_000, test_images=10_000),
)}
FASHION_MNIST = DATASETS["fashion-mnist"]


def idx_dataset(classes: tuple[str, ...], side: int, light_on_dark: bool) -> Dataset:
    """Any one-channel IDX set in the MNIST layout (the four files named as MNIST's), described
    by params.yaml's `data.idx`: no published checksums, so the files are checked for structure."""
    return Dataset("idx", tuple(classes), (1, side, side), "idx", {name: Checksum() for name in IDX_FILES},
                   light_on_dark=light_on_dark)
