"""Task: champion/challenger promotion of a registered model version."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task

from tasks.common import run_logger

CHAMPION = "champion"
CHALLENGER = "challenger"
# The metric that decides promotion; lower is better.
DECIDING_METRIC = "eval.frechet_distance"
# The Fréchet distance is only comparable at the same sample count and seed, under the same
# classifier (identified by its test accuracy, since a dataset version has one cached classifier).
SAMPLE_COUNT = "eval.num_samples"
SAMPLE_SEED = "eval.seed"
CLASSIFIER_ACCURACY = "eval.classifier_test_accuracy"
MATCHING_KEYS = (SAMPLE_COUNT, SAMPLE_SEED, CLASSIFIER_ACCURACY)


def tag_text(key: str, value: float) -> str:
    """Text of a metric as stored in a version tag; counts and seeds as integers."""
    return str(int(value)) if key in (SAMPLE_COUNT, SAMPLE_SEED) else f"{value:.6g}"


def current_champion(client: MlflowClient, model_name: str):
    """The model version holding the champion alias, or None when there is none yet."""
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def decide(metrics: dict[str, float] | None, champion_tags: dict[str, str] | None) -> tuple[bool, str]:
    """Return (promote, reason) for a challenger with ``metrics`` against a champion's version tags.

    The challenger wins only with a lower Fréchet distance measured at the same sample count and
    seed as the champion's. The first version (no champion) always wins.
    """
    if champion_tags is None:
        return True, "no champion yet"
    if not metrics or DECIDING_METRIC not in metrics:
        return False, "challenger was not evaluated"
    if DECIDING_METRIC not in champion_tags:
        return False, "champion has no evaluation to compare with"
    for key in MATCHING_KEYS:
        if key not in metrics and key not in champion_tags:
            continue
        mine = tag_text(key, metrics[key]) if key in metrics else "missing"
        if champion_tags.get(key, "missing") != mine:
            return False, f"{key} differs from the champion's ({champion_tags.get(key, 'missing')} vs {mine})"
    challenger_fd = float(metrics[DECIDING_METRIC])
    champion_fd = float(champion_tags[DECIDING_METRIC])
    if challenger_fd < champion_fd:
        return True, f"Fréchet distance {challenger_fd:.4f} beats the champion's {champion_fd:.4f}"
    return False, f"Fréchet distance {challenger_fd:.4f} does not beat the champion's {champion_fd:.4f}"


@task(name="promote_model", retries=2, retry_delay_seconds=5)
def promote_model(model_name: str, version: str, tracking_uri: str, metrics: dict[str, float] | None = None,
                  mlflow_run_id: str | None = None) -> str:
    """Make ``version`` the challenger, tag it with its metrics, and promote it to champion if it wins.

    Returns the alias the version ends with: "champion" or "challenger". Safe to retry: a version
    that is already champion stays champion.
    """
    logger = run_logger()
    client = MlflowClient(tracking_uri)

    # 1. Challenger alias and metric tags on the version.
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    for key, value in (metrics or {}).items():
        client.set_model_version_tag(model_name, version, key, tag_text(key, value))

    # 2. Compare with the champion.
    champion = current_champion(client, model_name)
    if champion is not None and str(champion.version) == str(version):
        promote, reason = True, "already champion"
    else:
        promote, reason = decide(metrics, None if champion is None else dict(champion.tags))
    if promote:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    outcome = CHAMPION if promote else CHALLENGER
    previous = "none" if champion is None else str(champion.version)
    logger.info("Version %s of %s: %s (previous champion: %s); %s", version, model_name, outcome, previous, reason)

    # 3. Record the decision on the version and on the run.
    client.set_model_version_tag(model_name, version, "promotion.decision", outcome)
    client.set_model_version_tag(model_name, version, "promotion.reason", reason)
    if mlflow_run_id:
        client.set_tag(mlflow_run_id, "promotion.decision", outcome)
        client.set_tag(mlflow_run_id, "promotion.reason", reason)
        client.set_tag(mlflow_run_id, "promotion.previous_champion", previous)
    return outcome
