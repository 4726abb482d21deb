"""Prefect tasks of the pipeline: thin wrappers over ``ddpm_core`` that pass paths and ids."""

from tasks.prepare_dataset import prepare_dataset
from tasks.register_model import register_model
from tasks.sample_images import render_gif, sample_images
from tasks.train_model import train_model

__all__ = ["prepare_dataset", "register_model", "render_gif", "sample_images", "train_model"]
