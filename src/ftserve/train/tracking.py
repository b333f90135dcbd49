"""Optional MLflow tracking: params, metrics, the adapter as an artifact, a registered version + alias.

MLflow is the ``mlflow`` extra; training works without it and writes the same card.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ftserve.train.settings import MlflowSettings

log = logging.getLogger("ftserve.train")


def _flatten(prefix: str, obj: object, out: dict[str, object]) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    else:
        out[prefix] = obj


def log_run(settings: MlflowSettings, card: dict, adapter_dir: Path) -> dict[str, str] | None:
    """Log one finished training run; returns run id, and model name/version/alias when registered."""
    if not settings.enabled:
        return None
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here; never phone home
    try:
        import mlflow
        from mlflow import MlflowClient
    except ImportError as exc:
        raise RuntimeError("mlflow.enabled is true but MLflow is not installed: pip install 'ftserve[mlflow]'") from exc
    mlflow.set_tracking_uri(settings.tracking_uri)
    if mlflow.get_experiment_by_name(settings.experiment) is None:
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
        mlflow.create_experiment(settings.experiment, artifact_location=settings.artifact_root.resolve().as_uri())
    mlflow.set_experiment(settings.experiment)
    params: dict[str, object] = {}
    _flatten("", card["hyperparameters"], params)
    metrics: dict[str, object] = {}
    _flatten("", card["metrics"], metrics)
    with mlflow.start_run(run_name=card["name"]) as run:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in metrics.items() if isinstance(v, int | float)})
        mlflow.set_tags({"adapter": card["name"], "base": card["base"]["ref"], "data_sha256": card["data"]["sha256"]})
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        out = {"run_id": run.info.run_id}
        source = mlflow.get_artifact_uri("adapter")
    if settings.registered_model:
        # The adapter is a plain artifact folder (PEFT files + card), not an MLflow model flavour, so the
        # version is created from its artifact URI rather than with mlflow.register_model("runs:/...").
        client = MlflowClient()
        name = settings.registered_model
        try:
            client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(name, description="LoRA adapter trained by ftserve")
        version = client.create_model_version(name, source=source, run_id=out["run_id"])
        client.set_registered_model_alias(name, settings.alias, version.version)
        out |= {"registered_model": settings.registered_model, "version": str(version.version), "alias": settings.alias}
    log.info("MLflow: %s", out)
    return out
