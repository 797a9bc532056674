"""The auditors' HTTP API and page (FastAPI; OpenAPI at ``/docs``).

``build_router(repo)`` is what the service's HTTP app includes; ``create_app(url)`` serves it
standalone. Every data request needs an API key (``Authorization: Bearer <key>`` or
``X-API-Key``); every access, the page included, is written to ``api_access_log``. A
tenant-scoped key only ever sees its own tenant's decisions.

The OpenAPI document declares both ways of sending the key as security schemes (so ``/docs``'s
"Authorize" and "Try it out" send one), describes every parameter, and lists each route's error
responses: the auditors are sent to ``/docs`` to learn the API.
"""


import contextlib
import csv
import datetime as dt
import io
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from audit import checkpoint, keys, partitions
from audit.keys import Principal
from audit.repository import SUMMARY_COLUMNS, AuditRepository, BadCursor, DecisionFilter
from audit.time_range import FROM_HELP as TIME_FROM_HELP
from audit.time_range import TO_HELP as TIME_TO_HELP
from audit.time_range import BadBound, parse_range
from audit.why import candidate_rows, render_text

log = logging.getLogger(__name__)
PAGE = Path(__file__).resolve().parent / "page.html"
# Whatever the service accepts as a tenant or label (decision.validation: no NUL, <= 256): a narrower
# pattern would leave some tenants' decisions impossible to filter. Queries are parameterised.
NAME = r"^[^\x00]{1,256}$"
DECISION_ID = r"^[A-Za-z0-9\-]{1,64}$"
EXPORT_COLUMNS = (*SUMMARY_COLUMNS, "outcome_status", "outcome_ttft_ms", "outcome_latency_ms", "conflicting_outcomes")
_json = msgspec.json.Encoder()


def _name(description: str) -> Any:
    return Query(pattern=NAME, max_length=256, description=description)


# The CLI's --help says the same of --from/--to (audit.time_range): one parser, one set of rules.
FROM_HELP = (f"Decisions {TIME_FROM_HELP}. Examples: `2026-11-29`, `2026-11-29T08:00:00Z`, "
             "`2026-11-29T09:00:00+01:00`, `2026-11-29T08:00` (UTC). Refused (422): anything else.")
TO_HELP = (f"Decisions {TIME_TO_HELP}: `from=D&to=D` is day D, as `infermesh audit query --from D --to D` and "
           "`audit verify` take it. Refused (422): anything else.")
CURSOR_HELP = ("The `next_cursor` of the previous page, passed back unchanged (it is opaque) with the same "
               "filters, for the next, older page. Absent: the first, newest page. A cursor this API did not "
               "issue is refused (422).")
LIMIT_HELP = ("Decisions per page, 1-500 (default 50). `infermesh audit query --limit` reads the database "
              "directly and takes up to 10,000; for every matching decision at once use `/v1/export`.")


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
    """The body of ``POST /v1/admin/retention``."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"retention_days": 90}]})
    retention_days: int = Field(ge=1, le=3650, description="Days kept, today (UTC) included: every day partition "
                                "older than that is dropped, for every tenant (1-3650).")


class Problem(BaseModel):
    """What an error response carries."""

    detail: str | list[dict[str, Any]] = Field(
        description="What is wrong, as a sentence; for a 422 FastAPI raises itself, its list of validation "
                    "errors, each naming the parameter (`loc`).")


_ERRORS = {
    401: "No API key, or one that is unknown or revoked. Send it as `Authorization: Bearer KEY` or "
         "`X-API-Key: KEY` (`infermesh audit keys create` makes one).",
    403: "The key may not do this: a tenant-scoped key asking for another tenant.",
    404: "No such decision (for a tenant-scoped key, none of its tenant).",
    422: "A parameter this route refuses: a value out of range or not of the form described (a number for "
         "`from`/`to`, say), a `from` not before `to`, a cursor this API did not issue, or a query parameter "
         "the route does not take (a misspelt filter is refused, not ignored, so it cannot widen a search).",
}


def _errors(*codes: int, **texts: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for ``codes``; ``texts`` (``e403="..."``) replaces a code's general description."""
    return {code: {"model": Problem, "description": texts.get(f"e{code}", _ERRORS.get(code, ""))} for code in codes}


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
    # Declared as security schemes so the OpenAPI document (and /docs' "Authorize") knows how a key is
    # sent; auto_error off: a missing key is our 401, logged, whichever way it was (not) sent.
    bearer = HTTPBearer(scheme_name="bearer", auto_error=False, bearerFormat="imk_<KEY_ID>_<secret>",
                        description="An API key (`infermesh audit keys create`) as `Authorization: Bearer KEY`.")
    api_key = APIKeyHeader(name="X-API-Key", scheme_name="apiKey", auto_error=False,
                           description="The same API key in an `X-API-Key` header instead.")

    def principal(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
                  header_key: Annotated[str | None, Security(api_key)]) -> Principal:
        secret = (credentials.credentials if credentials is not None else header_key or "").strip()
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
                start: Annotated[str | None, Query(alias="from", max_length=64, description=FROM_HELP,
                                                   examples=["2026-11-29", "2026-11-29T08:00:00Z"])] = None,
                end: Annotated[str | None, Query(alias="to", max_length=64, description=TO_HELP,
                                                 examples=["2026-11-30", "2026-11-29T12:00:00+01:00"])] = None,
                tenant: Annotated[str | None, _name(
                    "Only this tenant's decisions (exact match). A tenant-scoped key sees only its own tenant "
                    "whether or not this is given; another tenant is refused (403).")] = None,
                region: Annotated[str | None, _name("Only decisions routed to this region (exact match).")] = None,
                site: Annotated[str | None, _name("Only decisions routed to this site id (exact match).")] = None,
                tier: Annotated[Literal["datacenter", "edge", "device"] | None, Query(
                    description="Only decisions routed to this tier.")] = None,
                model: Annotated[str | None, _name("Only requests for this model (exact match).")] = None,
                endpoint: Annotated[str | None, _name(
                    "Only decisions routed to this endpoint id (exact match).")] = None,
                rule: Annotated[str | None, _name(
                    "Only denied decisions (`denied`, `quota_denied`) with this rule among those that removed "
                    "their candidates: the rule id exactly as their `deny_rules` shows it (e.g. "
                    "`safety.gpu_temperature`); no prefix or pattern matching. A routed decision matches no "
                    "rule: rules that removed only some of its candidates are in its trace.")] = None,
                status: Annotated[Literal["routed", "denied", "quota_denied"] | None, Query(
                    description="Only decisions with this status: `routed`, `denied` (rules removed every "
                                "candidate) or `quota_denied` (a quota refused the request).")] = None,
                outcome: Annotated[Literal["ok", "error", "timeout", "cancelled", "none"] | None, Query(
                    description="Only decisions whose reported outcome has this status; `none`: no outcome "
                                "reported (yet).")] = None) -> DecisionFilter:
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
        try:
            start_at, end_at = parse_range(start, end)
        except BadBound as exc:  # "from '...': why", as the API's other refusals name their parameter
            raise HTTPException(422, str(exc)) from None
        return DecisionFilter(start=start_at, end=end_at, tenant=tenant, region=region, site=site, tier=tier,
                              model=model, endpoint=endpoint, rule=rule, status=status, outcome_status=outcome)

    Filters = Annotated[DecisionFilter, Depends(filters)]

    def one(decision_id: str, p: Principal) -> dict[str, Any]:
        d = repo.get_decision(decision_id)
        if d is None or (p.tenant is not None and d["tenant"] != p.tenant):
            raise HTTPException(404, "no such decision")
        return d

    @router.get("/v1/decisions", tags=["audit"], responses=_errors(401, 403, 422))
    def list_decisions(f: Filters,
                       cursor: Annotated[str | None, Query(max_length=200, pattern=r"^[A-Za-z0-9_\-]+$",
                                                           description=CURSOR_HELP)] = None,
                       limit: Annotated[int, Query(ge=1, le=500, description=LIMIT_HELP)] = 50) -> dict[str, Any]:
        """Decisions newest first, a page at a time: `items`, and `next_cursor` (`null` on the last page),
        to pass back as `cursor`."""
        try:
            items, nxt = repo.list_decisions(filters=f, cursor=cursor, limit=limit)
        except BadCursor as exc:
            raise HTTPException(422, "bad cursor") from exc
        return {"items": items, "next_cursor": nxt}

    @router.get("/v1/decisions/{decision_id}", tags=["audit"], responses=_errors(401, 404, 422))
    def get_decision(decision_id: Annotated[str, _path_id()],
                     p: Annotated[Principal, Depends(principal)]) -> dict[str, Any]:
        """One decision with its full trace and outcome, and the "why" table rows."""
        d = one(decision_id, p)
        d["why"] = candidate_rows(d)
        return d

    @router.get("/v1/decisions/{decision_id}/why", tags=["audit"], response_class=PlainTextResponse,
                responses=_errors(401, 404, 422))
    def why(decision_id: Annotated[str, _path_id()], p: Annotated[Principal, Depends(principal)]) -> str:
        """Why this route, as readable text."""
        return render_text(one(decision_id, p))

    @router.get("/v1/export", tags=["audit"], responses={
        **_errors(401, 403, 422, e422=_ERRORS[422] + " `trace=true` with `format=csv` is refused: a CSV export "
                                                     "carries no traces."),
        200: {"description": "Every matching decision, newest first.",
              "content": {"application/x-ndjson": {}, "text/csv": {}}}})
    def export(f: Filters, format: Annotated[Literal["csv", "jsonl"], Query(
                   description="`jsonl` (default): one JSON object per decision, values exact (the evidence "
                               "copy). `csv`: the summary columns, cells that would start a spreadsheet "
                               "formula prefixed with `'`; no traces.")] = "jsonl",
               trace: Annotated[bool, Query(description="`true`: each JSON line also carries the decision's full "
                                                        "trace. JSONL only: refused with `format=csv`.")] = False,
               ) -> StreamingResponse:
        """Every matching decision, streamed as JSON lines or CSV (`trace=true`: JSON lines with traces)."""
        if trace and format == "csv":  # used to be dropped silently: an export without what was asked for
            raise HTTPException(422, "trace: traces are exported as JSON lines only; use format=jsonl with "
                                     "trace=true, or format=csv without trace")
        if format == "csv":
            return StreamingResponse(_csv(repo, f), media_type="text/csv",
                                     headers={"Content-Disposition": "attachment; filename=decisions.csv"})
        return StreamingResponse(_jsonl(repo, f, trace), media_type="application/x-ndjson")

    @router.get("/v1/stats", tags=["audit"], responses=_errors(401, 403, 422))
    def stats(f: Filters) -> dict[str, Any]:
        """Decisions by status, denials by rule, routes by tier, TTFT by route."""
        return repo.stats(filters=f)

    @router.get("/v1/checkpoint", tags=["audit"], response_class=PlainTextResponse, responses=_errors(
        401, 403, 422, e403="Chain heads span tenants: a tenant-scoped key may not read them."))
    def chain_checkpoint(
            p: Annotated[Principal, Depends(principal)],
            start: Annotated[dt.date | None, Query(alias="from", description=(
                "First UTC day whose chain heads to list, YYYY-MM-DD (default: the oldest)"))] = None,
            end: Annotated[dt.date | None, Query(alias="to", description=(
                "Last UTC day, inclusive, YYYY-MM-DD (default: the newest)"))] = None) -> str:
        """Every hash chain's head now (of the UTC days `from` to `to`), as ``infermesh audit
        checkpoint`` writes it: keep it outside the database, check it later with ``infermesh
        audit verify --checkpoint``. Chains span tenants, so a key limited to one tenant may not
        read it."""
        if p.tenant is not None:
            raise HTTPException(403, "chain heads span tenants: this needs a key for every tenant")
        if start is not None and end is not None and start > end:
            raise HTTPException(422, f"from: {start} is after to ({end})")
        heads = checkpoint.chain_heads(repo.url, start=start, end=end)
        return checkpoint.render(heads, dt.datetime.now(dt.UTC))

    @router.post("/v1/admin/retention", tags=["admin"], responses=_errors(
        401, 403, 422, e403="Not an admin key, or an admin key scoped to one tenant (day partitions span "
                            "tenants)."))
    def retention(body: Annotated[RetentionRequest, Body(openapi_examples={
                      "ninety days": {"summary": "keep the last 90 days", "value": {"retention_days": 90}}})],
                  p: Annotated[Principal, Depends(admin)]) -> dict[str, Any]:
        """Drop the day partitions older than `retention_days` (admin key for every tenant: partitions span
        tenants). Body: `{"retention_days": N}`, JSON. Returns the days dropped."""
        if p.tenant is not None:
            raise HTTPException(403, "retention drops every tenant's days: this needs a key for every tenant")
        with repo.pool.connection() as conn:
            dropped = partitions.apply_retention(conn, retention_days=body.retention_days, today=_today())
        return {"dropped_days": [d.isoformat() for d in dropped]}

    @router.post("/v1/admin/reload", tags=["admin"], responses={
        **_errors(401, 403, e403="Not an admin key, or an admin key scoped to one tenant (the bundle applies "
                                 "to every tenant)."),
        409: {"model": Problem, "description": "The new bundle failed its check or its tests: the old one "
                                               "keeps running; `detail` says why."},
        501: {"model": Problem, "description": "This process has no policy bundle reload wired."},
        200: {"description": "The bundle now running.", "content": {"application/json": {
            "example": {"revision": "3f9c2a1"}}}}})
    def do_reload(p: Annotated[Principal, Depends(admin)]) -> dict[str, Any]:
        """Reload the policy bundle (admin key for every tenant: the bundle applies to all). No body.
        Returns the revision now running."""
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
    """A standalone app serving the auditors' API and page; its connection pool closes when the
    app shuts down (its lifespan: a server's stop, a ``TestClient`` left as a context manager)."""
    repo = AuditRepository(url)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            repo.close()

    app = FastAPI(title="InferMesh audit API", version="1", lifespan=lifespan,
                  description="Find any routing decision, see why it went where it went, export evidence.")
    app.include_router(build_router(repo, reload=reload, today=today))
    app.state.audit_repo = repo
    return app
