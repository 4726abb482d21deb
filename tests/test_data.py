"""Tests for ddpm_core.data: IDX parsing, TFDS preparation and loading, all offline.

Most tests write tiny IDX files themselves. Tests that use the ``real_mnist_dir`` fixture
use the original MNIST files from $DDPM_MNIST_DIR and are skipped when it is unset.
"""

import gzip
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
from absl import logging as absl_logging

from ddpm_core import data

TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def write_idx(path, array, *, magic=None, dims=None, payload=None):
    """Write a gzip IDX file: big-endian magic and dims, then the uint8 payload.

    ``magic``, ``dims`` and ``payload`` override the values derived from ``array`` so that
    tests can write malformed files.
    """
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
    if dims is None:
        dims = array.shape
    if payload is None:
        payload = array.tobytes()
    header = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)
    with gzip.open(path, "wb") as stream:
        stream.write(header + payload)
    return str(path)


def write_tiny_mnist(folder, num_train=12, num_test=5, seed=0):
    """Write the four MNIST files with tiny random content and return the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(num_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=(num_train,), dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(num_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=(num_test,), dtype=np.uint8),
    }
    # Make sure both extreme pixel values round-trip.
    arrays["train_images"][0, 0, 0] = 0
    arrays["train_images"][0, 0, 1] = 255
    for key, array in arrays.items():
        write_idx(folder / data.MNIST_FILES[key], array)
    return arrays


@pytest.fixture
def tiny_mnist(tmp_path):
    folder = tmp_path / "tiny_mnist"
    arrays = write_tiny_mnist(folder)
    return str(folder), arrays


@pytest.fixture
def offline_network(monkeypatch):
    """Send any HTTP(S) request to a closed loopback port, so that no test can reach a host."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")


@pytest.fixture(scope="module")
def real_mnist_dir():
    mnist_dir = os.environ.get(data.MNIST_DIR_ENV)
    if not mnist_dir:
        pytest.skip(
            f"{data.MNIST_DIR_ENV} is not set: point it at a folder with the four original "
            "MNIST .gz files to run the tests on real MNIST"
        )
    return mnist_dir


@pytest.fixture(scope="module")
def real_prepared(real_mnist_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("real_data")
    prepared_dir = data.prepare_mnist(str(data_dir), mnist_dir=real_mnist_dir)
    return str(data_dir), prepared_dir


# read_idx


def test_read_idx_round_trips_images(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    path = write_idx(tmp_path / "images.gz", images)

    parsed = data.read_idx(path)

    assert parsed.dtype == np.uint8
    assert parsed.shape == (2, 3, 4)
    np.testing.assert_array_equal(parsed, images)


def test_read_idx_round_trips_labels(tmp_path):
    labels = np.array([7, 0, 9, 3], dtype=np.uint8)
    path = write_idx(tmp_path / "labels.gz", labels)

    parsed = data.read_idx(path)

    assert parsed.dtype == np.uint8
    assert parsed.shape == (4,)
    np.testing.assert_array_equal(parsed, labels)


def test_read_idx_returns_writable_array(tmp_path):
    path = write_idx(tmp_path / "labels.gz", [1, 2])

    parsed = data.read_idx(path)
    parsed[0] = 5

    assert parsed[0] == 5


def test_read_idx_rejects_wrong_magic(tmp_path):
    path = write_idx(tmp_path / "images.gz", np.zeros((1, 2, 2)), magic=0x00000804)

    with pytest.raises(data.DatasetError) as excinfo:
        data.read_idx(path)

    message = str(excinfo.value)
    assert path in message
    assert "0x00000803" in message
    assert "0x00000804" in message


def test_read_idx_rejects_truncated_payload(tmp_path):
    images = np.ones((3, 4, 4), dtype=np.uint8)
    path = write_idx(tmp_path / "images.gz", images, payload=images[:2].tobytes())

    with pytest.raises(data.DatasetError) as excinfo:
        data.read_idx(path)

    message = str(excinfo.value)
    assert path in message
    assert "truncated" in message
    assert "require 48 bytes, found 32" in message


def test_read_idx_rejects_extra_payload(tmp_path):
    labels = np.ones(3, dtype=np.uint8)
    path = write_idx(tmp_path / "labels.gz", labels, payload=labels.tobytes() + b"\x00")

    with pytest.raises(data.DatasetError) as excinfo:
        data.read_idx(path)

    assert path in str(excinfo.value)
    assert "extra bytes" in str(excinfo.value)


def test_read_idx_rejects_truncated_header(tmp_path):
    path = tmp_path / "labels.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(struct.pack(">I", LABELS_MAGIC))

    with pytest.raises(data.DatasetError) as excinfo:
        data.read_idx(str(path))

    assert str(path) in str(excinfo.value)
    assert "header is truncated" in str(excinfo.value)


def test_read_idx_rejects_non_gzip_bytes(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(b"this is not a gzip stream")

    with pytest.raises(data.DatasetError) as excinfo:
        data.read_idx(str(path))

    assert str(path) in str(excinfo.value)
    assert "gzip" in str(excinfo.value)


def test_read_idx_rejects_cut_gzip_stream(tmp_path):
    full = write_idx(tmp_path / "full.gz", np.arange(200, dtype=np.uint8))
    path = tmp_path / "cut.gz"
    content = open(full, "rb").read()
    path.write_bytes(content[: len(content) // 2])

    with pytest.raises(data.DatasetError) as excinfo:
        data.read_idx(str(path))

    assert str(path) in str(excinfo.value)


def test_read_idx_missing_file(tmp_path):
    path = str(tmp_path / "absent-idx1-ubyte.gz")

    with pytest.raises(data.DatasetError) as excinfo:
        data.read_idx(path)

    assert path in str(excinfo.value)
    assert data.MNIST_DIR_ENV in str(excinfo.value)


# resolve_mnist_dir and source_fingerprint


def test_resolve_mnist_dir_prefers_argument(monkeypatch):
    monkeypatch.setenv(data.MNIST_DIR_ENV, "/from/env")

    assert data.resolve_mnist_dir("/from/argument") == "/from/argument"
    assert data.resolve_mnist_dir(None) == "/from/env"


def test_resolve_mnist_dir_without_env(monkeypatch):
    monkeypatch.delenv(data.MNIST_DIR_ENV, raising=False)

    assert data.resolve_mnist_dir(None) is None


def test_resolve_mnist_dir_empty_env(monkeypatch):
    monkeypatch.setenv(data.MNIST_DIR_ENV, "")

    assert data.resolve_mnist_dir(None) is None


def test_source_fingerprint_changes_with_file(tiny_mnist):
    mnist_dir, arrays = tiny_mnist
    before = data.source_fingerprint(mnist_dir, verify_checksums=False)
    again = data.source_fingerprint(mnist_dir, verify_checksums=False)

    labels = arrays["test_labels"].copy()
    labels[0] = (labels[0] + 1) % 10
    write_idx(os.path.join(mnist_dir, data.MNIST_FILES["test_labels"]), labels)
    after = data.source_fingerprint(mnist_dir, verify_checksums=False)

    assert before == again
    assert after != before
    assert len(before) == 16
    int(before, 16)  # hex digest


def test_source_fingerprint_for_download_is_stable():
    assert data.source_fingerprint(None) == data.source_fingerprint(None, verify_checksums=False)


def test_source_fingerprint_missing_file(tiny_mnist):
    mnist_dir, _ = tiny_mnist
    missing = os.path.join(mnist_dir, data.MNIST_FILES["test_images"])
    os.remove(missing)

    with pytest.raises(data.DatasetError) as excinfo:
        data.source_fingerprint(mnist_dir, verify_checksums=False)

    assert missing in str(excinfo.value)
    assert data.MNIST_DIR_ENV in str(excinfo.value)


def test_source_fingerprint_missing_folder(tmp_path):
    missing = str(tmp_path / "no_such_folder")

    with pytest.raises(data.DatasetError) as excinfo:
        data.source_fingerprint(missing)

    assert missing in str(excinfo.value)


def test_checksums_tsv_matches_expected_sha256():
    url_infos = data.DdpmMnist.url_infos

    assert url_infos is not None
    assert len(url_infos) == len(data.MNIST_FILES)
    for filename in data.MNIST_FILES.values():
        url = data.DdpmMnist.URL + filename
        assert url in url_infos, url
        assert url_infos[url].checksum == data.MNIST_SHA256[filename]
        assert url_infos[url].filename == filename


def test_builder_pickle_keeps_source_dir(tiny_mnist, tmp_path):
    mnist_dir, _ = tiny_mnist
    builder = data.DdpmMnist(data_dir=str(tmp_path / "data"), source_dir=mnist_dir)

    restored = pickle.loads(pickle.dumps(builder))

    assert restored._source_dir == mnist_dir
    assert restored.data_dir == builder.data_dir


def test_module_reload_in_same_process():
    # Runs in a subprocess so that reloading does not replace classes this session uses.
    code = "import importlib, ddpm_core.data as d; importlib.reload(d); print(d.DdpmMnist.name)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ddpm_mnist"


# prepare_mnist and load_split on tiny files


def test_prepare_and_load_tiny_files(tiny_mnist, tmp_path):
    mnist_dir, arrays = tiny_mnist
    data_dir = str(tmp_path / "data")
    absl_level_before = absl_logging.get_absl_logger().level

    prepared_dir = data.prepare_mnist(data_dir, mnist_dir=mnist_dir, verify_checksums=False)
    train_images, train_labels = data.load_split(prepared_dir, "train")
    test_images, test_labels = data.load_split(prepared_dir, "test")

    assert prepared_dir.startswith(data_dir)
    assert prepared_dir.endswith(os.path.join("ddpm_mnist", "1.0.0"))
    assert train_images.shape == (12, 28, 28, 1)
    assert train_images.dtype == np.uint8
    assert train_labels.shape == (12,)
    assert train_labels.dtype == np.int32
    assert test_images.shape == (5, 28, 28, 1)
    assert test_labels.shape == (5,)
    np.testing.assert_array_equal(train_images[..., 0], arrays["train_images"])
    np.testing.assert_array_equal(train_labels, arrays["train_labels"])
    np.testing.assert_array_equal(test_images[..., 0], arrays["test_images"])
    np.testing.assert_array_equal(test_labels, arrays["test_labels"])
    assert absl_logging.get_absl_logger().level == absl_level_before


def test_prepare_reuses_prepared_tiny_data(tiny_mnist, tmp_path):
    mnist_dir, _ = tiny_mnist
    data_dir = str(tmp_path / "data")
    first = data.prepare_mnist(data_dir, mnist_dir=mnist_dir, verify_checksums=False)
    info_path = os.path.join(first, "dataset_info.json")
    mtime_before = os.stat(info_path).st_mtime_ns

    second = data.prepare_mnist(data_dir, mnist_dir=mnist_dir, verify_checksums=False)

    assert second == first
    assert os.stat(info_path).st_mtime_ns == mtime_before


def test_prepare_reads_folder_from_env(tiny_mnist, tmp_path, monkeypatch):
    mnist_dir, arrays = tiny_mnist
    monkeypatch.setenv(data.MNIST_DIR_ENV, mnist_dir)

    prepared_dir = data.prepare_mnist(str(tmp_path / "data"), verify_checksums=False)
    _, test_labels = data.load_split(prepared_dir, "test")

    np.testing.assert_array_equal(test_labels, arrays["test_labels"])


def test_prepare_rebuilds_after_source_change(tiny_mnist, tmp_path):
    mnist_dir, arrays = tiny_mnist
    data_dir = str(tmp_path / "data")
    first = data.prepare_mnist(data_dir, mnist_dir=mnist_dir, verify_checksums=False)

    new_labels = (arrays["train_labels"] + 1) % 10
    write_idx(os.path.join(mnist_dir, data.MNIST_FILES["train_labels"]), new_labels)
    second = data.prepare_mnist(data_dir, mnist_dir=mnist_dir, verify_checksums=False)
    _, first_labels = data.load_split(first, "train")
    _, second_labels = data.load_split(second, "train")

    assert second != first
    np.testing.assert_array_equal(first_labels, arrays["train_labels"])
    np.testing.assert_array_equal(second_labels, new_labels)


def test_prepare_verifies_checksums_of_tiny_files(tiny_mnist, tmp_path):
    mnist_dir, _ = tiny_mnist
    filename = data.MNIST_FILES["train_images"]

    with pytest.raises(data.DatasetError) as excinfo:
        data.prepare_mnist(str(tmp_path / "data"), mnist_dir=mnist_dir)

    message = str(excinfo.value)
    assert os.path.join(mnist_dir, filename) in message
    assert data.MNIST_SHA256[filename] in message
    assert "verify_checksums=False" in message


def test_prepare_rejects_count_mismatch(tmp_path):
    mnist_dir = tmp_path / "mismatch"
    arrays = write_tiny_mnist(mnist_dir)
    write_idx(mnist_dir / data.MNIST_FILES["test_labels"], arrays["test_labels"][:4])

    with pytest.raises(data.DatasetError) as excinfo:
        data.prepare_mnist(str(tmp_path / "data"), mnist_dir=str(mnist_dir), verify_checksums=False)

    message = str(excinfo.value)
    assert data.MNIST_FILES["test_images"] in message
    assert data.MNIST_FILES["test_labels"] in message
    assert "5 images" in message
    assert "4 labels" in message


def test_prepare_rejects_wrong_image_size(tmp_path):
    mnist_dir = tmp_path / "small_images"
    write_tiny_mnist(mnist_dir)
    write_idx(mnist_dir / data.MNIST_FILES["train_images"], np.zeros((12, 8, 8)))

    with pytest.raises(data.DatasetError) as excinfo:
        data.prepare_mnist(str(tmp_path / "data"), mnist_dir=str(mnist_dir), verify_checksums=False)

    assert data.MNIST_FILES["train_images"] in str(excinfo.value)
    assert "28x28" in str(excinfo.value)


def test_prepare_rejects_swapped_files(tmp_path):
    mnist_dir = tmp_path / "swapped"
    arrays = write_tiny_mnist(mnist_dir)
    write_idx(mnist_dir / data.MNIST_FILES["test_images"], arrays["test_labels"])

    with pytest.raises(data.DatasetError) as excinfo:
        data.prepare_mnist(str(tmp_path / "data"), mnist_dir=str(mnist_dir), verify_checksums=False)

    assert data.MNIST_FILES["test_images"] in str(excinfo.value)
    assert "0x00000803" in str(excinfo.value)


def test_prepare_rejects_out_of_range_label(tmp_path):
    mnist_dir = tmp_path / "bad_label"
    arrays = write_tiny_mnist(mnist_dir)
    labels = arrays["train_labels"].copy()
    labels[3] = 10
    write_idx(mnist_dir / data.MNIST_FILES["train_labels"], labels)

    with pytest.raises(data.DatasetError) as excinfo:
        data.prepare_mnist(str(tmp_path / "data"), mnist_dir=str(mnist_dir), verify_checksums=False)

    assert data.MNIST_FILES["train_labels"] in str(excinfo.value)
    assert "0-9" in str(excinfo.value)


def test_prepare_after_failure_succeeds(tmp_path):
    mnist_dir = tmp_path / "fixed_later"
    arrays = write_tiny_mnist(mnist_dir)
    labels_path = mnist_dir / data.MNIST_FILES["test_labels"]
    data_dir = str(tmp_path / "data")
    write_idx(labels_path, arrays["test_labels"][:4])
    with pytest.raises(data.DatasetError):
        data.prepare_mnist(data_dir, mnist_dir=str(mnist_dir), verify_checksums=False)

    write_idx(labels_path, arrays["test_labels"])
    prepared_dir = data.prepare_mnist(data_dir, mnist_dir=str(mnist_dir), verify_checksums=False)
    _, test_labels = data.load_split(prepared_dir, "test")

    np.testing.assert_array_equal(test_labels, arrays["test_labels"])


def test_load_split_before_prepare(tmp_path):
    with pytest.raises(data.DatasetError) as excinfo:
        data.load_split(str(tmp_path), "train")

    assert str(tmp_path) in str(excinfo.value)
    assert "prepare_mnist" in str(excinfo.value)


def test_load_split_unknown_split(tiny_mnist, tmp_path):
    mnist_dir, _ = tiny_mnist
    prepared_dir = data.prepare_mnist(str(tmp_path / "data"), mnist_dir=mnist_dir, verify_checksums=False)

    with pytest.raises(ValueError) as excinfo:
        data.load_split(prepared_dir, "validation")

    assert "validation" in str(excinfo.value)
    assert "train" in str(excinfo.value)


def test_download_path_rejects_wrong_checksum(tmp_path, monkeypatch, offline_network):
    # TFDS takes files named like the originals from <download_dir>/manual instead of
    # downloading them, and checks them against checksums.tsv like a download.
    monkeypatch.delenv(data.MNIST_DIR_ENV, raising=False)
    data_dir = tmp_path / "data"
    write_tiny_mnist(data_dir / "downloads" / "manual")

    with pytest.raises(data.DatasetError) as excinfo:
        data.prepare_mnist(str(data_dir), verify_checksums=False)

    assert "Checksum mismatch" in str(excinfo.value)
    assert "ubyte.gz" in str(excinfo.value)


# Real MNIST files from $DDPM_MNIST_DIR


def test_real_files_match_checksums_tsv(real_mnist_dir):
    url_infos = data.DdpmMnist.url_infos

    for filename in data.MNIST_FILES.values():
        info = url_infos[data.DdpmMnist.URL + filename]
        assert int(info.size) == os.path.getsize(os.path.join(real_mnist_dir, filename)), filename


def test_real_train_split(real_prepared):
    _, prepared_dir = real_prepared

    images, labels = data.load_split(prepared_dir, "train")

    assert images.shape == (60000, 28, 28, 1)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int32
    assert images.max() == 255
    assert np.bincount(labels, minlength=10).tolist() == TRAIN_LABEL_COUNTS


def test_real_test_split(real_prepared):
    _, prepared_dir = real_prepared

    images, labels = data.load_split(prepared_dir, "test")

    assert images.shape == (10000, 28, 28, 1)
    assert images.dtype == np.uint8
    assert images.max() == 255
    assert np.bincount(labels, minlength=10).tolist() == TEST_LABEL_COUNTS


def test_real_split_keeps_file_order(real_mnist_dir, real_prepared):
    _, prepared_dir = real_prepared
    expected_images = data.read_idx(os.path.join(real_mnist_dir, data.MNIST_FILES["test_images"]))
    expected_labels = data.read_idx(os.path.join(real_mnist_dir, data.MNIST_FILES["test_labels"]))

    images, labels = data.load_split(prepared_dir, "test")

    np.testing.assert_array_equal(images[..., 0], expected_images)
    np.testing.assert_array_equal(labels, expected_labels)


def test_real_prepare_again_reuses_data(real_mnist_dir, real_prepared):
    data_dir, prepared_dir = real_prepared
    info_path = os.path.join(prepared_dir, "dataset_info.json")
    mtime_before = os.stat(info_path).st_mtime_ns

    again = data.prepare_mnist(data_dir, mnist_dir=real_mnist_dir)

    assert again == prepared_dir
    assert os.stat(info_path).st_mtime_ns == mtime_before


def test_download_path_uses_manual_files(real_mnist_dir, real_prepared, tmp_path, monkeypatch, offline_network):
    # Without a local folder, prepare_mnist goes through TFDS's download manager, which
    # takes the files from <download_dir>/manual and verifies them against checksums.tsv.
    monkeypatch.delenv(data.MNIST_DIR_ENV, raising=False)
    data_dir = tmp_path / "data"
    manual_dir = data_dir / "downloads" / "manual"
    manual_dir.mkdir(parents=True)
    for filename in data.MNIST_FILES.values():
        os.symlink(os.path.join(real_mnist_dir, filename), manual_dir / filename)
    _, local_prepared_dir = real_prepared

    prepared_dir = data.prepare_mnist(str(data_dir))
    images, labels = data.load_split(prepared_dir, "test")

    # The download and the local folder have the same sha256s, so the same fingerprint.
    assert os.path.relpath(prepared_dir, data_dir) == os.path.relpath(
        local_prepared_dir, real_prepared[0]
    )
    assert images.shape == (10000, 28, 28, 1)
    assert np.bincount(labels, minlength=10).tolist() == TEST_LABEL_COUNTS
