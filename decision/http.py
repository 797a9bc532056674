"""The HTTP side of the service: /healthz, /metrics, and the auditors' API when audit is on."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from decision.metrics import ServiceMetrics
from decision.tracing import install_http_tracing


def create_app(metrics: ServiceMetrics, health: Callable[[], Mapping[str, Any]],
               routers: tuple[APIRouter, ...] = ()) -> FastAPI:
    app = FastAPI(title="InferMesh", version="1", description="InferMesh decision service: health, metrics "
                  "and the auditors' API over the decision log.")

    @app.get("/healthz", summary="Liveness and details (policy revision, audit queue, reload errors)")
    def healthz() -> JSONResponse:
        details = dict(health())
        return JSONResponse(details, status_code=200 if details.get("status") == "ok" else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    for r in routers:
        app.include_router(r)
    install_http_tracing(app)  # traceparent in, trace id into the JSON logs
    app.add_exception_handler(RequestValidationError, _validation_error)
    return app


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own 422, except that a non-UTF-8 body is echoed escaped instead of failing with a 500."""
    assert isinstance(exc, RequestValidationError)
    errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b.decode("utf-8", "backslashreplace")})
    return JSONResponse({"detail": errors}, status_code=422)


class HttpServer:
    """uvicorn in a background thread, stoppable."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout_s / 0.05)):
            if self._server.started:
                return
            deadline.wait(0.05)
        raise OSError("HTTP server did not start")

    @property
    def port(self) -> int:
        servers = getattr(self._server, "servers", [])
        for s in servers:
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return 0

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
