"""Prefect flows that chain the pipeline's tasks, and the ``ddpm`` command line."""
