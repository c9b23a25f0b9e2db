"""What operators and browsers use, without an API token: health, readiness, metrics, the playground page.

* `GET /healthz`: 200 while the process is alive (even while loading or draining);
* `GET /readyz`: 200 with each model's engine load, 503/3040 while loading, draining or with no model served;
* `GET /metrics`: Prometheus text (`metrics.py`: request and error counts, latencies, tokens, neurons per account,
  cache and rate-limit counts, engine slots, the phase, the process). It names every account that used the server,
  so `--metrics-token` makes it answer only `Authorization: Bearer <that token>`. While the model loads, before
  these routes exist, the lifecycle gate answers it (`metrics.LoadingMetrics`, the same token);
* `GET /` and `GET /playground/{asset}`: the playground (`playground/`), with a strict Content-Security-Policy;
* `GET /docs`: the API's routes from `/openapi.json`, a page of the same package under the same policy (FastAPI's
  Swagger UI, loaded from a CDN, is turned off in `app.py`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from starlette.responses import Response

from .. import playground
from ..deps import Services, metrics_access
from ..errors import NO_ROUTE, NOT_READY, ApiError, json_response
from ..protocol.answers import ErrorEnvelope

__all__ = ["router"]

router = APIRouter(tags=["Operations"])

# what the document says of the answers these routes build themselves (FastAPI sees only `-> Response`)
READYZ_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorEnvelope, "description": "loading, shutting down or no model served (3040), with Retry-After"},
}
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the Prometheus text exposition format (version 0.0.4)",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
    401: {"model": ErrorEnvelope, "description": "with `--metrics-token`: not `Bearer <that token>` (10000)"},
}


@router.get("/healthz", summary="Liveness")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="Readiness, with each model's slots and queue", responses=READYZ_RESPONSES)
async def readyz(app: Services) -> Response:
    models = {}
    for name, engine in app.engines.items():
        stats = engine.stats()
        models[name] = {"running": stats.running, "waiting": stats.waiting, "slots": stats.slots,
                        "free_slots": stats.free_slots, "max_queue": stats.max_queue}
    if not app.lifecycle.ready:
        raise ApiError(NOT_READY, reason=app.lifecycle.not_ready_reason(), headers=app.retry_headers)
    if not app.engines or not all(e.accepting for e in app.engines.values()):
        reason = "no model is served" if not app.engines else "the server is starting or shutting down"
        raise ApiError(NOT_READY, reason=reason, headers=app.retry_headers)
    return json_response({"status": "ready", "models": models})


@router.get("/metrics", summary="Prometheus metrics", dependencies=[Depends(metrics_access)],
            response_class=Response, responses=METRICS_RESPONSES)  # no media type: the 200 says text/plain
async def prometheus_metrics(app: Services) -> Response:
    return app.metrics.exposition()


@router.get("/", include_in_schema=False)
async def playground_page() -> Response:
    return Response(playground.page(), media_type="text/html", headers=playground.page_security_headers())


@router.get("/docs", include_in_schema=False)
async def docs_page() -> Response:
    return Response(playground.docs_page(), media_type="text/html", headers=playground.PAGE_SECURITY_HEADERS)


@router.get("/playground/{name}", include_in_schema=False)
async def playground_asset(name: str) -> Response:
    if name not in playground.ASSET_TYPES:
        raise ApiError(NO_ROUTE)
    return Response(playground.asset(name), media_type=playground.ASSET_TYPES[name],
                    headers=playground.PAGE_SECURITY_HEADERS)
