"""Task: prepare MNIST as TFDS array_record files."""

from __future__ import annotations

import os
import uuid
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from ddpm_core.data import prepare_mnist, resolve_mnist_dir, source_fingerprint
from tasks.common import run_logger


def dataset_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache on the source files' checksums and the output folder.

    While the prepared folder is missing the key is unique, so a cached path is only ever returned
    when the folder it names still exists.
    """
    mnist_dir = resolve_mnist_dir(parameters.get("mnist_dir"))
    data_dir = os.path.abspath(parameters["data_dir"])
    fingerprint = source_fingerprint(mnist_dir, verify_checksums=parameters.get("verify_checksums", True))
    if not os.path.isdir(os.path.join(data_dir, f"source-{fingerprint}")):
        return f"mnist-{fingerprint}-missing-{uuid.uuid4().hex}"
    return f"mnist-{fingerprint}-{data_dir}"


@task(name="prepare_dataset", cache_key_fn=dataset_cache_key, retries=1, retry_delay_seconds=5, persist_result=True)
def prepare_dataset(data_dir: str, mnist_dir: str | None = None, verify_checksums: bool = True) -> str:
    """Prepare the MNIST splits under ``data_dir``; return the prepared TFDS folder.

    ``mnist_dir`` (or ``$DDPM_MNIST_DIR``) is a local folder with the four original .gz files. With
    neither, the files are downloaded from TFDS's MNIST addresses and their checksums verified.
    """
    logger = run_logger()
    source = resolve_mnist_dir(mnist_dir)
    logger.info("Preparing MNIST in %s from %s", data_dir, source or "TFDS's download addresses")
    prepared = prepare_mnist(os.path.abspath(data_dir), source, verify_checksums=verify_checksums)
    logger.info("MNIST ready in %s", prepared)
    return prepared
