"""The auditors' HTTP API and page (FastAPI; OpenAPI at ``/docs``).

``build_router(repo)`` is what the service's HTTP app includes; ``create_app(url)`` serves it
standalone. Every data request needs an API key (``Authorization: Bearer <key>`` or
``X-API-Key``); every access, the page included, is written to ``api_access_log``. A
tenant-scoped key only ever sees its own tenant's decisions.
"""


import csv
import datetime as dt
import io
import logging
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from audit import checkpoint, keys, partitions
from audit.keys import Principal
from audit.repository import SUMMARY_COLUMNS, AuditRepository, BadCursor, DecisionFilter
from audit.why import candidate_rows, render_text

log = logging.getLogger(__name__)
PAGE = Path(__file__).resolve().parent / "page.html"
# Whatever the service accepts as a tenant or label (decision.validation: no NUL, <= 256): a narrower
# pattern would leave some tenants' decisions impossible to filter. Queries are parameterised.
NAME = r"^[^\x00]{1,256}$"
DECISION_ID = r"^[A-Za-z0-9\-]{1,64}$"
EXPORT_COLUMNS = (*SUMMARY_COLUMNS, "outcome_status", "outcome_ttft_ms", "outcome_latency_ms", "conflicting_outcomes")
_json = msgspec.json.Encoder()

Name = Annotated[str | None, Query(pattern=NAME, max_length=256)]


# Every query parameter of the endpoints that take filters (the filters, paging, export format).
_FILTER_NAMES = frozenset({"from", "to", "tenant", "region", "site", "tier", "model", "endpoint", "rule", "status",
                           "outcome"})
# What each filtered route takes besides the filters: anything else is refused, not ignored.
_ROUTE_QUERY_NAMES = {"/v1/decisions": _FILTER_NAMES | {"cursor", "limit"},
                      "/v1/export": _FILTER_NAMES | {"format", "trace"},
                      "/v1/stats": _FILTER_NAMES}


def _logged_route(repo: AuditRepository) -> type[APIRoute]:
    class LoggedRoute(APIRoute):
        """Writes one ``api_access_log`` row per request, whatever its outcome."""

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def logged(request: Request) -> Response:
                status = 500
                try:
                    response = await handler(request)
                    status = response.status_code
                    return response
                except HTTPException as exc:
                    status = exc.status_code
                    raise
                except RequestValidationError:
                    status = 422
                    raise
                finally:
                    try:
                        with repo.pool.connection() as conn:
                            keys.log_access(conn, principal=getattr(request.state, "principal", None),
                                            method=request.method, path=request.url.path,
                                            query=str(request.url.query), status=status,
                                            client=request.client.host if request.client else "")
                    except Exception:
                        log.exception("audit API: could not log an access")
            return logged
    return LoggedRoute


class RetentionRequest(BaseModel):
    retention_days: int = Field(ge=1, le=3650)


def build_router(repo: AuditRepository, *, reload: Callable[[], str] | None = None,
                 today: Callable[[], dt.date] | None = None) -> APIRouter:
    """The auditors' API and page over ``repo``.

    Parameters
    ----------
    repo : AuditRepository
        Where decisions, keys and the access log live.
    reload : callable, optional
        What ``POST /v1/admin/reload`` runs (e.g. the policy bundle reload); returns a revision.
    today : callable, optional
        The current UTC date (retention), for tests.
    """
    router = APIRouter(route_class=_logged_route(repo))
    _today = today or (lambda: dt.datetime.now(dt.UTC).date())

    def principal(request: Request) -> Principal:
        auth = request.headers.get("authorization", "")
        secret = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not secret or len(secret) > 200:
            raise HTTPException(401, "an API key is required", headers={"WWW-Authenticate": "Bearer"})
        with repo.pool.connection() as conn:
            p = keys.lookup(conn, secret=secret)
        if p is None:
            raise HTTPException(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        request.state.principal = p
        return p

    def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
        if not p.is_admin:
            raise HTTPException(403, "this needs the admin role")
        return p

    def filters(request: Request, p: Annotated[Principal, Depends(principal)],
                start: Annotated[dt.datetime | None, Query(alias="from")] = None,
                end: Annotated[dt.datetime | None, Query(alias="to")] = None,
                tenant: Name = None, region: Name = None, site: Name = None,
                tier: Annotated[Literal["datacenter", "edge", "device"] | None, Query()] = None,
                model: Name = None, endpoint: Name = None, rule: Name = None,
                status: Annotated[Literal["routed", "denied", "quota_denied"] | None, Query()] = None,
                outcome: Annotated[Literal["ok", "error", "timeout", "cancelled", "none"] | None,
                                   Query()] = None) -> DecisionFilter:
        route = request.scope.get("route")
        known = _ROUTE_QUERY_NAMES.get(getattr(route, "path", ""), _FILTER_NAMES)
        unknown = sorted(set(request.query_params) - known)
        if unknown:  # a misspelt filter would quietly widen an evidence export to everything
            raise HTTPException(422, f"unknown query parameter(s) {', '.join(unknown)}; known here: "
                                     f"{', '.join(sorted(known))}")
        if p.tenant is not None:
            if tenant is not None and tenant != p.tenant:
                raise HTTPException(403, "this key may only read its own tenant")
            tenant = p.tenant
        for t in (start, end):
            if t is not None and t.tzinfo is None:
                raise HTTPException(422, "from/to need a time zone (e.g. 2025-01-01T00:00:00Z)")
        return DecisionFilter(start=start, end=end, tenant=tenant, region=region, site=site, tier=tier,
                              model=model, endpoint=endpoint, rule=rule, status=status, outcome_status=outcome)

    Filters = Annotated[DecisionFilter, Depends(filters)]

    def one(decision_id: str, p: Principal) -> dict[str, Any]:
        d = repo.get_decision(decision_id)
        if d is None or (p.tenant is not None and d["tenant"] != p.tenant):
            raise HTTPException(404, "no such decision")
        return d

    @router.get("/v1/decisions", tags=["audit"])
    def list_decisions(f: Filters,
                       cursor: Annotated[str | None, Query(max_length=200, pattern=r"^[A-Za-z0-9_\-]+$")] = None,
                       limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
        """Decisions newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
        try:
            items, nxt = repo.list_decisions(filters=f, cursor=cursor, limit=limit)
        except BadCursor as exc:
            raise HTTPException(422, "bad cursor") from exc
        return {"items": items, "next_cursor": nxt}

    @router.get("/v1/decisions/{decision_id}", tags=["audit"])
    def get_decision(decision_id: Annotated[str, _path_id()],
                     p: Annotated[Principal, Depends(principal)]) -> dict[str, Any]:
        """One decision with its full trace and outcome, and the "why" table rows."""
        d = one(decision_id, p)
        d["why"] = candidate_rows(d)
        return d

    @router.get("/v1/decisions/{decision_id}/why", tags=["audit"], response_class=PlainTextResponse)
    def why(decision_id: Annotated[str, _path_id()], p: Annotated[Principal, Depends(principal)]) -> str:
        """Why this route, as readable text."""
        return render_text(one(decision_id, p))

    @router.get("/v1/export", tags=["audit"])
    def export(f: Filters, format: Annotated[Literal["csv", "jsonl"], Query()] = "jsonl",
               trace: bool = False) -> StreamingResponse:
        """Every matching decision, streamed as CSV or JSON lines (``trace=true``: JSONL with traces)."""
        if format == "csv":
            return StreamingResponse(_csv(repo, f), media_type="text/csv",
                                     headers={"Content-Disposition": "attachment; filename=decisions.csv"})
        return StreamingResponse(_jsonl(repo, f, trace), media_type="application/x-ndjson")

    @router.get("/v1/stats", tags=["audit"])
    def stats(f: Filters) -> dict[str, Any]:
        """Decisions by status, denials by rule, routes by tier, TTFT by route."""
        return repo.stats(filters=f)

    @router.get("/v1/checkpoint", tags=["audit"], response_class=PlainTextResponse)
    def chain_checkpoint(p: Annotated[Principal, Depends(principal)]) -> str:
        """Every hash chain's head now, as ``infermesh audit checkpoint`` writes it: keep it outside
        the database, check it later with ``infermesh audit verify --checkpoint``. Chains span
        tenants, so a key limited to one tenant may not read it."""
        if p.tenant is not None:
            raise HTTPException(403, "chain heads span tenants: this needs a key for every tenant")
        return checkpoint.render(checkpoint.chain_heads(repo.url), dt.datetime.now(dt.UTC))

    @router.post("/v1/admin/retention", tags=["admin"])
    def retention(body: RetentionRequest, p: Annotated[Principal, Depends(admin)]) -> dict[str, Any]:
        """Drop day partitions older than ``retention_days`` (admin, for every tenant: partitions span them)."""
        if p.tenant is not None:
            raise HTTPException(403, "retention drops every tenant's days: this needs a key for every tenant")
        with repo.pool.connection() as conn:
            dropped = partitions.apply_retention(conn, retention_days=body.retention_days, today=_today())
        return {"dropped_days": [d.isoformat() for d in dropped]}

    @router.post("/v1/admin/reload", tags=["admin"])
    def do_reload(p: Annotated[Principal, Depends(admin)]) -> dict[str, Any]:
        """Reload the policy bundle (admin, for every tenant: the bundle applies to all)."""
        if p.tenant is not None:
            raise HTTPException(403, "the policy bundle applies to every tenant: this needs a key for every tenant")
        if reload is None:
            raise HTTPException(501, "reload is not wired in this process")
        try:
            return {"revision": reload()}
        except ValueError as exc:  # the new bundle failed check or its tests: the old one keeps running
            raise HTTPException(409, str(exc)) from None

    @router.get("/audit", include_in_schema=False, response_class=HTMLResponse)
    def page() -> str:
        """The auditors' page (the key is typed in, or passed as ``#key=...``)."""
        return PAGE.read_text()

    # Last, so it takes only what no route above does: a wrong method or path under /v1 is answered
    # (405 / 404) through the logged route class, so every access to the API is in the access log.
    @router.api_route("/v1/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                      include_in_schema=False)
    def unmatched(request: Request, rest: str, _: Annotated[Principal, Depends(principal)]) -> RedirectResponse:
        # The key first, as on every route: a caller without one learns nothing of the routes, and a
        # caller with one is logged under it.
        path = request.url.path
        routes = [r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is not unmatched]
        allowed = sorted({m for r in routes if r.path_regex.match(path) for m in r.methods or ()})
        if allowed:
            raise HTTPException(405, "method not allowed", headers={"Allow": ", ".join(allowed)})
        bare = path.rstrip("/")
        if bare != path and any(r.path_regex.match(bare) for r in routes):  # as Starlette would without this route
            query = f"?{request.url.query}" if request.url.query else ""
            return RedirectResponse(bare + query, status_code=307)
        raise HTTPException(404, f"no such API route: {path}")

    return router


def _path_id() -> Any:
    from fastapi import Path as PathParam
    return PathParam(pattern=DECISION_ID, max_length=64)


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: request ids and tenants are client-chosen, and one that
    starts like a formula (``=HYPERLINK(...)``) would run when an auditor opens the export. JSONL
    stays exact, as the evidence copy."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _csv(repo: AuditRepository, f: DecisionFilter) -> Iterator[str]:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(EXPORT_COLUMNS)
    for row in repo.iter_decisions(filters=f):
        w.writerow([_cell(";".join(row[c]) if c == "deny_rules" else row.get(c)) for c in EXPORT_COLUMNS])
        if buf.tell() > 65536:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def _jsonl(repo: AuditRepository, f: DecisionFilter, trace: bool) -> Iterator[bytes]:
    chunk: list[bytes] = []
    for row in repo.iter_decisions(filters=f, with_trace=trace):
        chunk.append(_json.encode(row) + b"\n")
        if len(chunk) >= 500:
            yield b"".join(chunk)
            chunk = []
    yield b"".join(chunk)


def create_app(url: str, *, reload: Callable[[], str] | None = None,
               today: Callable[[], dt.date] | None = None) -> FastAPI:
    """A standalone app serving the auditors' API and page."""
    repo = AuditRepository(url)
    app = FastAPI(title="InferMesh audit API", version="1",
                  description="Find any routing decision, see why it went where it went, export evidence.")
    app.include_router(build_router(repo, reload=reload, today=today))
    app.state.audit_repo = repo
    return app
