"""Flow: sample a GIF and a PNG grid from a registered model version or alias."""

from __future__ import annotations

import os
import time

from prefect import flow
from prefect.runtime import flow_run

from tasks import render_gif, sample_images
from tasks.common import run_logger
from tasks.sample_images import model_uri_for
from tasks.settings import load_mlflow_settings
from tasks.tracking import PREFECT_FLOW_RUN_TAG, end_run, start_run


@flow(name="sample_pipeline")
def sample_pipeline(
    model: str = "@champion",
    num_samples: int = 64,
    seed: int = 0,
    sampler: str = "ddpm",
    steps: int = 0,
    eta: float = 0.0,
    frame_every: int = 20,
    batch_size: int = 256,
    digits: list[int] | None = None,
    guidance_scale: float = 2.0,
    grid_cols: int = 8,
    upscale: int = 3,
    output_dir: str = "outputs",
    mlflow_config: str | None = None,
) -> dict[str, str]:
    """Generate samples from ``model`` (NAME@alias, NAME/VERSION, @alias or a version number).

    The GIF and the grid are written to ``output_dir/sample-<time>/`` and logged to a new MLflow
    run tagged with the model URI.
    """
    logger = run_logger()
    settings = load_mlflow_settings(mlflow_config)
    tracking_uri = settings.resolved_tracking_uri()
    model_uri = model_uri_for(model, settings.registered_model_name)
    run_name = f"sample-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = os.path.abspath(os.path.join(output_dir, run_name))
    flow_run_id = str(flow_run.id) if flow_run.id else ""
    params = {"model_uri": model_uri, "num_samples": num_samples, "seed": seed, "sampler": sampler,
              "steps": steps, "eta": eta, "digits": ",".join(map(str, digits or [])),
              "guidance_scale": guidance_scale}
    mlflow_run_id = start_run(settings, run_name, params, {PREFECT_FLOW_RUN_TAG: flow_run_id, "kind": "sampling"})
    try:
        samples_path = sample_images(model_uri, tracking_uri, out_dir, num_samples=num_samples, seed=seed,
                                     sampler=sampler, steps=steps, eta=eta, frame_every=frame_every,
                                     batch_size=batch_size, digits=digits, guidance_scale=guidance_scale)
        gif_path, png_path = render_gif(samples_path, out_dir, mlflow_run_id, tracking_uri, grid_cols=grid_cols,
                                        upscale=upscale)
    except BaseException:
        end_run(settings, mlflow_run_id, "FAILED")
        raise
    end_run(settings, mlflow_run_id, "FINISHED")
    logger.info("Sampled %s into %s", model_uri, out_dir)
    return {"mlflow_run_id": mlflow_run_id, "model_uri": model_uri, "samples_path": samples_path,
            "gif_path": gif_path, "png_path": png_path}
