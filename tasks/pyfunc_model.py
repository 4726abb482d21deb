"""The registered MLflow model: a ``pyfunc`` that generates images from the EMA weights.

Input: a pandas DataFrame with one row. Columns (all optional but ``num_samples``):
``num_samples`` (int), ``seed`` (int), ``sampler`` ("ddpm", "ddpm_large", "ddim" or
"dpm_solver_pp"), ``steps`` (int, steps of ddim and dpm_solver_pp, 0 is the sampler's default), ``eta`` (float, DDIM only), ``digits`` (comma-separated digits, class-conditional
models only) and ``guidance_scale`` (float, 2 by default; it applies with ``digits``).

Output: float32 array [num_samples, 28, 28, 1] with pixel values in [-1, 1].
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema, TensorSpec

MODEL_ARTIFACT = "model"
# MLflow checks the model by predicting this example when it is logged, so it is kept cheap.
INPUT_EXAMPLE = pd.DataFrame({"num_samples": [1], "seed": [0], "sampler": ["ddim"], "steps": [2]})
SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec("long", "num_samples"),
        ColSpec("long", "seed", required=False),
        ColSpec("string", "sampler", required=False),
        ColSpec("long", "steps", required=False),
        ColSpec("double", "eta", required=False),
        ColSpec("string", "digits", required=False),
        ColSpec("double", "guidance_scale", required=False),
    ]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28, 1))]),
)


def parse_digits(value: Any) -> list[int] | None:
    """Parse "2,7,3" (or a list) into [2, 7, 3]; empty or missing gives None."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, str):
        parts = [part.strip() for part in value.replace(" ", ",").split(",") if part.strip()]
        try:
            return [int(part) for part in parts] or None
        except ValueError:
            raise ValueError(f"digits must be integers separated by commas, got {value!r}") from None
    return [int(item) for item in value] or None


def _field(row: dict[str, Any], key: str, default: Any) -> Any:
    """Value of an optional request column; missing, None and NaN give ``default``."""
    value = row.get(key)
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return default
    return value


class DdpmSampler(mlflow.pyfunc.PythonModel):
    """Generate MNIST-like digits with the packaged EMA weights."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from ddpm_core.checkpoint import load_model

        self.apply_fn, self.params, self.config = load_model(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from ddpm_core.generate import generate

        if len(model_input) != 1:
            raise ValueError(f"expected one request row, got {len(model_input)}")
        row = model_input.iloc[0].to_dict()
        if "num_samples" not in row:
            raise ValueError("the request needs a num_samples column")
        images, _ = generate(
            self.apply_fn,
            self.params,
            self.config,
            num_samples=int(row["num_samples"]),
            seed=int(_field(row, "seed", 0)),
            sampler=str(_field(row, "sampler", "ddpm")),
            steps=int(_field(row, "steps", 0)),
            eta=float(_field(row, "eta", 0.0)),
            digits=parse_digits(row.get("digits")),
            guidance_scale=float(_field(row, "guidance_scale", 2.0)),
        )
        return images
