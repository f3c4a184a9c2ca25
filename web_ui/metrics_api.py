"""GET /metrics: Prometheus text format (docs/metrics.md). Guarded by the access token like every API."""

from __future__ import annotations

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST

from web_ui.extensions import services

bp = Blueprint("metrics_api", __name__)


@bp.get("/metrics")
def metrics():
    return Response(services().metrics.render(), content_type=CONTENT_TYPE_LATEST)
