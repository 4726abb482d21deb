"""MNIST preparation and loading through TensorFlow Datasets (TFDS), without TensorFlow.

Sources. The four original gzip IDX files (``MNIST_FILES``) come from one of two places:

- A local folder: the ``mnist_dir`` argument, else the ``DDPM_MNIST_DIR`` environment
  variable. Nothing is downloaded, so this is the setting for offline machines. Each file's
  sha256 is checked against ``MNIST_SHA256`` unless ``verify_checksums=False``.
- Otherwise, a download from TFDS's MNIST mirror (the URL of the stock TFDS ``mnist``
  builder). TFDS checks each download's size and sha256 against ``checksums.tsv`` beside
  this module. As with any TFDS download, files named like the originals in
  ``<data_dir>/downloads/manual/`` are used in place of a download and checked the same way.

Layout under ``data_dir``::

    <data_dir>/downloads/                          TFDS download cache
    <data_dir>/source-<fingerprint>/ddpm_mnist/1.0.0/
        dataset_info.json, features.json           TFDS metadata
        ddpm_mnist-train.array_record-*            60,000 examples
        ddpm_mnist-test.array_record-*             10,000 examples

``<fingerprint>`` is ``source_fingerprint()`` of the source files, so changed source files are
prepared into a new folder instead of reusing data prepared from other files. Folders for
earlier source files stay on disk until deleted by hand. Each
example is ``{"image": uint8 [28, 28, 1], "label": class id 0-9}``. Examples are stored in the
original file order because shuffling is disabled at write time.

Reading goes through TFDS data sources (random access to array_record files), which work
without TensorFlow. ``tfds.as_dataset`` and ``tfds.as_numpy`` need TensorFlow and are not used.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import struct
import urllib.parse
import zlib
from collections.abc import Iterator

import numpy as np
import requests
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from etils import epath
from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError
from tensorflow_datasets.image_classification import mnist as tfds_mnist

logger = logging.getLogger(__name__)

MNIST_DIR_ENV = "DDPM_MNIST_DIR"

MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# sha256 of the original files. They equal the checksums that TFDS 4.9.10 registers for its
# mnist builder (tensorflow_datasets/url_checksums/mnist.txt).
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10

_IDX_IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dimensions [N, H, W]
_IDX_LABELS_MAGIC = 0x00000801  # uint8 data, 1 dimension [N]
_IDX_NUM_DIMS = {_IDX_IMAGES_MAGIC: 3, _IDX_LABELS_MAGIC: 1}

_FINGERPRINT_HEX_CHARS = 16
_LOAD_BATCH_SIZE = 10_000

_MNIST_DIR_HINT = (
    f"Set {MNIST_DIR_ENV} or --mnist-dir to a folder with the four original MNIST .gz files "
    f"({', '.join(MNIST_FILES.values())})."
)


class DatasetError(ValueError):
    """A dataset source file is missing, corrupt, truncated, inconsistent or has an unexpected
    checksum, or its download failed."""


def resolve_mnist_dir(mnist_dir: str | None) -> str | None:
    """Return the local MNIST folder to use: ``mnist_dir`` if given, else ``$DDPM_MNIST_DIR``.

    An empty string counts as not given. ``None`` means no local folder, so
    ``prepare_mnist`` downloads the files.
    """
    if mnist_dir:
        return os.fspath(mnist_dir)
    return os.environ.get(MNIST_DIR_ENV) or None


def read_idx(path: str) -> np.ndarray:
    """Parse one gzip-compressed IDX file of unsigned bytes.

    Returns uint8 images [N, H, W] for magic 0x00000803 (MNIST: H = W = 28) or uint8
    labels [N] for magic 0x00000801. Raises DatasetError, naming the file, the expected
    value and the found value, if the file is missing, is not a valid gzip stream, has
    another magic number, has a truncated header or a zero image side, or has a payload
    whose size does not match the header.
    """
    try:
        with gzip.open(path, "rb") as stream:
            content = stream.read()
    except FileNotFoundError as err:
        raise DatasetError(f"IDX file not found: {path}. {_MNIST_DIR_HINT}") from err
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DatasetError(
            f"{path} is not a valid gzip file ({err}): expected a complete gzip-compressed "
            "IDX file. Replace it with an intact copy of the original file."
        ) from err

    if len(content) < 4:
        raise DatasetError(
            f"{path}: IDX header is truncated: expected at least 4 bytes, found {len(content)}."
        )
    (magic,) = struct.unpack(">I", content[:4])
    if magic not in _IDX_NUM_DIMS:
        raise DatasetError(
            f"{path}: invalid IDX magic number: expected 0x{_IDX_IMAGES_MAGIC:08x} (images) "
            f"or 0x{_IDX_LABELS_MAGIC:08x} (labels), found 0x{magic:08x}."
        )

    num_dims = _IDX_NUM_DIMS[magic]
    header_size = 4 + 4 * num_dims
    if len(content) < header_size:
        raise DatasetError(
            f"{path}: IDX header is truncated: expected {header_size} bytes for "
            f"{num_dims} dimension(s), found {len(content)}."
        )
    dims = struct.unpack(f">{num_dims}I", content[4:header_size])
    if num_dims == 3 and 0 in dims[1:]:
        raise DatasetError(
            f"{path}: invalid image size {dims[1]}x{dims[2]}: expected both sides > 0."
        )

    expected_bytes = int(np.prod(dims))
    found_bytes = len(content) - header_size
    if found_bytes != expected_bytes:
        problem = "truncated" if found_bytes < expected_bytes else "followed by extra bytes"
        raise DatasetError(
            f"{path}: IDX payload is {problem}: header dimensions {list(dims)} require "
            f"{expected_bytes} bytes, found {found_bytes}."
        )

    # The bytearray copy makes the returned array writable.
    return np.frombuffer(bytearray(content), dtype=np.uint8, offset=header_size).reshape(dims)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def source_fingerprint(mnist_dir: str | None, verify_checksums: bool = True) -> str:
    """Return a 16-character hex digest of the four source files' sha256s, for use as a cache key.

    For ``mnist_dir=None`` (download) the digest covers the expected checksums
    ``MNIST_SHA256``, so it equals the digest of a folder with the original files.
    Raises DatasetError if the folder or a file is missing, or, with
    ``verify_checksums=True``, if a file's sha256 differs from ``MNIST_SHA256``.
    """
    if mnist_dir is None:
        digests = {name: MNIST_SHA256[name] for name in MNIST_FILES.values()}
    else:
        if not os.path.isdir(mnist_dir):
            raise DatasetError(f"MNIST folder not found: {mnist_dir}. {_MNIST_DIR_HINT}")
        digests = {}
        for name in MNIST_FILES.values():
            path = os.path.join(mnist_dir, name)
            if not os.path.isfile(path):
                raise DatasetError(f"MNIST file not found: {path}. {_MNIST_DIR_HINT}")
            digests[name] = _file_sha256(path)
            if verify_checksums and digests[name] != MNIST_SHA256[name]:
                raise DatasetError(
                    f"Checksum mismatch for {path}: expected sha256 {MNIST_SHA256[name]}, "
                    f"found {digests[name]}. Replace it with the original MNIST file, or pass "
                    "verify_checksums=False to accept other well-formed IDX files."
                )

    listing = "".join(f"{name} {digest}\n" for name, digest in digests.items())
    return hashlib.sha256(listing.encode()).hexdigest()[:_FINGERPRINT_HEX_CHARS]


def _read_split_arrays(images_path: str, labels_path: str) -> dict[str, np.ndarray]:
    """Read and cross-check one split: uint8 images [N, 28, 28] and uint8 labels [N]."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)

    if images.ndim != 3:
        raise DatasetError(
            f"{images_path}: expected an IDX image file (magic 0x{_IDX_IMAGES_MAGIC:08x}), "
            f"found a file with {images.ndim} dimension(s)."
        )
    if images.shape[1:] != IMAGE_SHAPE[:2]:
        raise DatasetError(
            f"{images_path}: expected {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]} images, "
            f"found {images.shape[1]}x{images.shape[2]}."
        )
    if labels.ndim != 1:
        raise DatasetError(
            f"{labels_path}: expected an IDX label file (magic 0x{_IDX_LABELS_MAGIC:08x}), "
            f"found a file with {labels.ndim} dimensions."
        )
    if len(images) == 0:
        raise DatasetError(f"{images_path}: expected at least one image, found none.")
    if len(images) != len(labels):
        raise DatasetError(
            f"Image and label counts differ: {images_path} has {len(images)} images, "
            f"{labels_path} has {len(labels)} labels. Both files must come from the same split."
        )
    if labels.max() >= NUM_CLASSES:
        raise DatasetError(
            f"{labels_path}: expected labels 0-{NUM_CLASSES - 1}, found {labels.max()}."
        )
    return {"images": images, "labels": labels}


class DdpmMnist(tfds_mnist.MNIST, skip_registration=True):
    """MNIST stored as raw uint8 tensors, so that neither writing nor reading needs TensorFlow.

    The stock TFDS ``mnist`` builder gunzips through ``tf.io.gfile`` and encodes images as
    PNG with TensorFlow. This builder keeps its URL and parses the IDX files with gzip and
    NumPy instead. ``skip_registration`` keeps the class out of TFDS's name registry
    (its name is still ``ddpm_mnist``), so re-executing this module does not raise
    "already registered". Nothing looks the builder up by name.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "uint8 image tensors [28, 28, 1] in original file order."}

    def __init__(self, *, source_dir: str | None = None, **kwargs):
        """Create the builder. ``source_dir`` is a local folder with ``MNIST_FILES``, or None to download.

        Other keyword arguments go to ``tfds.core.GeneratorBasedBuilder``.
        """
        self._source_dir = source_dir
        super().__init__(**kwargs)
        # TFDS pickles a builder as its constructor arguments and calls __init__ on unpickling.
        self._original_state["source_dir"] = source_dir

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """Path of this module. TFDS reads the builder's checksums.tsv from the same folder.

        TFDS's default finds the module through importlib.resources, which fails when
        ddpm_core is imported as a namespace package (e.g. from a stale editable install).
        """
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "The MNIST database of handwritten digits, stored as uint8 tensors "
                "[28, 28, 1] in the original file order."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://yann.lecun.com/exdb/mnist/",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        if self._source_dir is None:
            urls = {key: urllib.parse.urljoin(self.URL, name) for key, name in MNIST_FILES.items()}
            # TFDS checks each file's size and sha256 against checksums.tsv beside this module.
            # NOTE: only the manual-folder case of this call is tested, because the test
            # machines are offline. The HTTP download and its error handling have not been run.
            downloaded = dl_manager.download(urls)
            paths = {key: os.fspath(path) for key, path in downloaded.items()}
        else:
            paths = {key: os.path.join(self._source_dir, name) for key, name in MNIST_FILES.items()}

        return [
            tfds.core.SplitGenerator(
                name=tfds.Split.TRAIN,
                gen_kwargs=_read_split_arrays(paths["train_images"], paths["train_labels"]),
            ),
            tfds.core.SplitGenerator(
                name=tfds.Split.TEST,
                gen_kwargs=_read_split_arrays(paths["test_images"], paths["test_labels"]),
            ),
        ]

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image[:, :, np.newaxis], "label": int(label)}


@contextlib.contextmanager
def _absl_warnings_only() -> Iterator[None]:
    """Raise the absl log level to WARNING while TFDS runs, then restore it.

    TFDS logs its progress through absl at INFO level. Warnings and errors still show.
    """
    absl_logger = absl_logging.get_absl_logger()
    previous_level = absl_logger.level
    if absl_logger.getEffectiveLevel() < logging.WARNING:
        absl_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        absl_logger.setLevel(previous_level)


def prepare_mnist(data_dir: str, mnist_dir: str | None = None, verify_checksums: bool = True) -> str:
    """Prepare the MNIST train and test splits as array_record files under ``data_dir``.

    Returns the builder's versioned data directory
    (``<data_dir>/source-<fingerprint>/ddpm_mnist/1.0.0``), the input of ``load_split``.

    ``mnist_dir`` is a local folder with the four original .gz files. If it is None, the
    folder comes from ``$DDPM_MNIST_DIR``, and if that is unset too, the files are
    downloaded from TFDS's MNIST mirror. ``verify_checksums=True`` checks each local file's
    sha256 against ``MNIST_SHA256``. ``False`` accepts any well-formed IDX files with
    28x28 images. Downloads are always checked by TFDS, whatever ``verify_checksums`` is.

    A second call with the same source files reuses the prepared data. Different source
    files give a different fingerprint and so a new folder. Raises DatasetError for a
    missing, corrupt or truncated file, a checksum mismatch, image and label counts that
    differ within a split, or a failed download.
    """
    source_dir = resolve_mnist_dir(mnist_dir)
    fingerprint = source_fingerprint(source_dir, verify_checksums=verify_checksums)
    source = source_dir if source_dir is not None else DdpmMnist.URL

    with _absl_warnings_only():
        builder = DdpmMnist(
            data_dir=os.path.join(data_dir, f"source-{fingerprint}"),
            source_dir=source_dir,
            file_format="array_record",
        )
        # The existence check first avoids TFDS's warning about a missing variant folder.
        if os.path.isdir(builder.data_dir) and builder.is_prepared():
            logger.info("Reusing MNIST prepared in %s", builder.data_dir)
            return builder.data_dir

        logger.info("Preparing MNIST in %s from %s", builder.data_dir, source)
        download_config = tfds.download.DownloadConfig(try_download_gcs=False)
        try:
            builder.download_and_prepare(
                download_dir=os.path.join(data_dir, "downloads"),
                download_config=download_config,
            )
        except NonMatchingChecksumError as err:
            raise DatasetError(
                f"Checksum mismatch for an MNIST file from {source}: {err}. Delete that "
                f"file so that it is downloaded again, or use local files. {_MNIST_DIR_HINT}"
            ) from err
        except (tfds.download.DownloadError, requests.RequestException) as err:
            raise DatasetError(
                f"Downloading MNIST from {source} failed: {err}. Without network access, "
                f"use local files. {_MNIST_DIR_HINT}"
            ) from err

    logger.info("Prepared MNIST in %s", builder.data_dir)
    return builder.data_dir


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a prepared split ("train" or "test") through a TFDS data source.

    ``data_dir`` is the directory that ``prepare_mnist`` returned. Returns images uint8
    [N, 28, 28, 1] and labels int32 [N] in the original file order. Raises DatasetError if
    ``data_dir`` contains no prepared dataset, and ValueError for an unknown split name.
    """
    if not os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        raise DatasetError(
            f"No prepared MNIST found in {data_dir} (dataset_info.json is missing). Run "
            "prepare_mnist() first and pass the directory it returns."
        )

    with _absl_warnings_only():
        builder = tfds.builder_from_directory(data_dir)
        if split not in builder.info.splits:
            raise ValueError(
                f"Unknown split {split!r} in {data_dir}: expected one of "
                f"{sorted(builder.info.splits)}."
            )
        source = builder.as_data_source(split=split)

    num_examples = len(source)
    image_shape = tuple(builder.info.features["image"].shape)
    images = np.empty((num_examples, *image_shape), dtype=np.uint8)
    labels = np.empty((num_examples,), dtype=np.int32)
    # Batched reads amortize the per-call cost of the array_record reader.
    for start in range(0, num_examples, _LOAD_BATCH_SIZE):
        stop = min(start + _LOAD_BATCH_SIZE, num_examples)
        examples = source.__getitems__(range(start, stop))
        images[start:stop] = np.stack([example["image"] for example in examples])
        labels[start:stop] = [example["label"] for example in examples]

    logger.info("Loaded %d %s examples from %s", num_examples, split, data_dir)
    return images, labels
