"""Service configuration: one YAML file validated at start-up, plus environment settings.

The YAML file (``deploy/demo/infermesh.yaml``) says what to serve; the environment (one
pydantic-settings class, read in one place) says where the databases are. Invalid configuration
fails fast with file:line: field, never silently falling back to a default.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from decision.tls import TlsConfig
from decision.yaml_lines import LocatedYaml, YamlSyntaxError, load_located_file


class _Section(BaseModel):
    # Strict types: a quoted "no" is not read as true, nor "8080" as a port (an int still serves as a float).
    # .inf and .nan are YAML floats: an infinite staleness limit would trust telemetry forever.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# A path is written as text in YAML; only paths are converted.
PathText = Annotated[Path, Field(strict=False)]


# Upper bound of every interval and timeout: a thread's wait() past threading.TIMEOUT_MAX raises and
# kills that thread (the scraper, the learner sync) long after start-up said the config was fine.
_DAY = 86_400.0


class ServerSection(_Section):
    host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    http_port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    # asyncio: the decision API on one event loop (fewer thread hand-offs per call); threads: grpcio's
    # threaded server with a pool of ``threads`` workers; split: gRPC itself (HTTP/2, TLS, health,
    # reflection) in a front process, the decisions in this one (decision/split_server.py), so the
    # transport's CPU and the engine's are two cores' work, not one GIL's.
    kind: Literal["asyncio", "threads", "split"] = "asyncio"
    threads: int = Field(default=32, ge=1, le=1024)
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=2**31 - 1)  # grpc takes a C int
    grace_s: float = Field(default=10.0, ge=0, le=_DAY)


def _scrape_url(url: str) -> str:
    """An http(s) URL with a host: anything else would only fail at every scrape, later."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return url


class ScrapeTarget(_Section):
    """An exporter to scrape: a serving endpoint's (vLLM, Triton; its node's GPU metrics, if it has any,
    go to that node) or a node's (dcgm-exporter)."""

    url: Annotated[str, AfterValidator(_scrape_url)]
    endpoint_id: str = ""
    node_id: str = ""

    @model_validator(mode="after")
    def _says_whose(self) -> ScrapeTarget:
        if not self.endpoint_id and not self.node_id:
            raise ValueError("name the endpoint_id or the node_id the exporter reports on")
        return self


class TelemetrySection(_Section):
    stale_after_s: float = Field(default=30.0, gt=0, le=_DAY)
    scrape_interval_s: float = Field(default=5.0, gt=0, le=_DAY)
    scrape_timeout_s: float = Field(default=2.0, gt=0, le=_DAY)
    scrape: list[ScrapeTarget] = []


class LearnerSection(_Section):
    name: str = "least-ttft"
    params: dict[str, Any] = {}
    shadow: list[dict[str, Any]] = []
    reward: dict[str, Any] = {}
    features: Literal["default", "basic"] = "default"
    # Persistence and replica merging through PostgreSQL (learners.sync), when the audit DB is on.
    sync_interval_s: float = Field(default=5.0, gt=0, le=_DAY)
    snapshot_every_s: float = Field(default=60.0, gt=0, le=_DAY)
    # Replica deltas are read in pages (learners.store.LearnerStore) of at most this many rows and,
    # past the first, bytes of their arrays, so that a page reads well within the statement timeout.
    delta_page_rows: int = Field(default=1000, ge=1, le=1_000_000)
    delta_page_bytes: int = Field(default=8 << 20, ge=1, le=1 << 30)
    # The learner replica id where INFERMESH_REPLICA is not set (see learner_replica).
    replica: str = ""


class DecisionSection(_Section):
    max_fallbacks: int = Field(default=3, ge=0, le=32)
    outcome_timeout_s: float = Field(default=300.0, gt=0, le=_DAY)
    max_candidates: int = Field(default=256, ge=1, le=1_000_000)
    # Score with this process's own-traffic ledger (decision/ledger.py): in-flight requests, the
    # prompts it sent still ahead in each endpoint's prefill, outcome-calibrated slowness, and the
    # delay a prompt adds to later requests. Off: the estimate reads telemetry alone.
    count_inflight: bool = True
    # InferMesh processes splitting the traffic to the same endpoints at random (every replica's
    # workers): each counts its own requests this many times in that ledger, or it would see a
    # 1/N share of the load and herd onto endpoints the others keep busy. 0: the workers `serve`
    # started this process among (1 for a single process); with several replicas, set it to their
    # total (and again when they are scaled).
    routers: int = Field(default=0, ge=0, le=4096)
    # How much of the delay a prompt adds to later requests at an endpoint counts against choosing it
    # (decision.scoring.ADDED_DELAY_WEIGHT): 0 ranks by the request's own expected TTFT alone.
    added_delay_weight: float = Field(default=1.0, ge=0.0, le=10.0)
    # Milliseconds of expected TTFT a choice trades for $0.001 per 1K output tokens
    # (decision.scoring.COST_WEIGHT_MS): 0 ranks by time alone.
    cost_weight_ms: float = Field(default=0.0, ge=0.0, le=100_000.0)


class LimitsSection(_Section):
    """Per-request limits enforced at the gRPC edge (``decision.edge.RequestLimits``)."""

    max_labels: int = Field(default=64, ge=0, le=4096)
    max_label_bytes: int = Field(default=256, ge=1, le=65536)
    max_jurisdictions: int = Field(default=32, ge=0, le=1024)
    max_telemetry_items: int = Field(default=10_000, ge=1)
    max_exposition_bytes: int = Field(default=1 << 20, ge=1)
    max_error_bytes: int = Field(default=4096, ge=0)
    max_field_chars: int = Field(default=256, ge=1, le=4096)


class ExtProcSection(_Section):
    """The Envoy ext_proc endpoint picker (``decision.extproc``), on its own port (see its docstring)."""

    enabled: bool = False
    port: int = Field(default=9002, ge=0, le=65535)
    max_streams: int = Field(default=256, ge=1, le=8192)
    # grpclib: gRPC over h2 on one event loop thread (cheapest per request, decision.extproc_grpclib);
    # asyncio: grpcio's asyncio server; threads: grpcio's threaded server, one worker per open stream.
    server: Literal["grpclib", "asyncio", "threads"] = "grpclib"
    # Header names and defaults: the fields of decision.extproc_config.ExtProcConfig.
    settings: dict[str, Any] = {}

    @field_validator("settings")
    @classmethod
    def _known_settings(cls, v: dict[str, Any]) -> dict[str, Any]:
        from decision.extproc_config import ExtProcConfig

        ExtProcConfig.from_mapping(v)  # its ValueError names the setting; checked at load, not at start
        return v


class ServiceConfig(_Section):
    fleet: PathText
    policies: PathText | None = None
    server: ServerSection = ServerSection()
    telemetry: TelemetrySection = TelemetrySection()
    learner: LearnerSection = LearnerSection()
    decision: DecisionSection = DecisionSection()
    audit: dict[str, Any] = {"enabled": True}
    limits: LimitsSection = LimitsSection()
    extproc: ExtProcSection = ExtProcSection()
    tls: TlsConfig | None = None
    path: PathText = Path(".")
    _line_of: Callable[[Sequence[str | int]], int] | None = PrivateAttr(default=None)

    @contextmanager
    def located(self, *loc: str | int) -> Iterator[None]:
        """Turn what a component built from section ``loc`` refuses (ValueError, TypeError, KeyError; an
        OverflowError from a huge number, an AttributeError from a list where a mapping goes) into a
        :class:`ConfigError` naming the file, line and field (learner parameters, the reward)."""
        try:
            yield
        except (ValueError, TypeError, KeyError, OverflowError, AttributeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            line = self._line_of(loc) if self._line_of is not None else None
            detail = str(exc) if not isinstance(exc, KeyError) else f"missing key {exc}"
            raise ConfigError(_error_line(self.path, line, loc, detail)) from None


class Settings(BaseSettings):
    """Environment settings; the only place the process environment is read for configuration."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_", extra="ignore")

    database_url: str = ""
    redis_url: str = ""
    data_dir: Path = Path("var")
    log_level: str = "INFO"
    replica: str = ""  # this process's learner replica id (wins over learner.replica; empty: single instance)
    worker: int | None = Field(default=None, ge=0)  # set by `serve --workers N` in each worker: its index
    workers: int | None = Field(default=None, ge=1)  # ... and N, which the command line may set, not the config
    otel_exporter: Literal["none", "console"] = "none"  # OpenTelemetry span exporter (decision.tracing)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        import logging

        level = v.strip().upper()
        if level not in logging.getLevelNamesMapping():  # what logging.setLevel takes (WARN, FATAL too)
            raise ValueError(f"unknown log level {v!r}; known: {', '.join(logging.getLevelNamesMapping())}")
        return level


class ConfigError(ValueError):
    pass


def learner_replica(config: ServiceConfig, settings: Settings) -> str:
    """This process's learner replica id: ``INFERMESH_REPLICA``, else the config's ``learner.replica``.

    The environment wins: it is what each process is given on its own (the pod name in
    ``deploy/k8s``), where one config file is often read by many processes.
    Deltas are keyed by replica, so an id is one live process's: a process started under an id
    another one holds is refused at start-up (``learners.store.ReplicaInUse``). A worker of
    ``serve --workers`` is given its id with ``-w<i>`` in ``INFERMESH_REPLICA`` by the parent
    (from this same choice); a worker given none gets ``-w<i>`` on the config's.

    Examples
    --------
    >>> cfg = ServiceConfig(fleet="f.yaml", learner=LearnerSection(replica="pod-a"))
    >>> learner_replica(cfg, Settings(replica="vm-1")), learner_replica(cfg, Settings(replica="vm-1-w1", worker=1))
    ('vm-1', 'vm-1-w1')
    >>> learner_replica(cfg, Settings(replica="")), learner_replica(cfg, Settings(replica="", worker=1))
    ('pod-a', 'pod-a-w1')
    """
    if settings.replica:
        return settings.replica
    if not config.learner.replica or settings.worker is None:
        return config.learner.replica
    from decision.workers import worker_replica  # workers builds services: imported when used

    return worker_replica(config.learner.replica, settings.worker)


def path_problem(p: Path, what: str = "file") -> str | None:
    """Why ``p`` cannot be read as a ``what``, for messages; None when it exists.

    >>> path_problem(Path("/no/such/infermesh.yaml"), "config file")
    '/no/such/infermesh.yaml: no such config file'
    """
    try:
        exists = p.exists()
    except (OSError, ValueError) as exc:  # a name too long for the file system (pathlib takes a NUL as absent)
        return f"{p}: cannot use the path: {exc}"
    return None if exists else f"{p}: no such {what}"


def load_config(path: str | Path) -> ServiceConfig:
    """Load and validate a service config; relative paths resolve against the file's folder."""
    p = Path(path)
    problem = path_problem(p, "config file")
    if problem is not None:
        raise ConfigError(problem)
    try:
        doc = load_located_file(p)
    except YamlSyntaxError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(doc.data, dict):
        raise ConfigError(f"{p}:1: expected a mapping at the top level")
    try:
        cfg = ServiceConfig.model_validate({**doc.data, "path": p})
    except ValidationError as exc:
        raise ConfigError(_located(p, doc, exc, ())) from None
    _check_audit_section(p, doc, cfg.audit)
    base = p.resolve().parent

    def located_path(field_loc: tuple[str, ...], value: str | Path, is_kind: Callable[[Path], bool] | None,
                     kind: str) -> Path:
        where = f"{p}:{doc.line_of(field_loc)}: {'.'.join(field_loc)}"
        try:  # a NUL byte or a name too long for the file system: an error here, not a traceback
            resolved = (base / value).resolve()
            ok = is_kind is None or is_kind(resolved)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}: cannot use the path: {exc}") from None
        if not ok:
            raise ConfigError(f"{where}: not a {kind}: {resolved}")
        return resolved

    updates: dict[str, Any] = {"fleet": located_path(("fleet",), cfg.fleet, Path.is_file, "file")}
    if cfg.policies is not None:
        updates["policies"] = located_path(("policies",), cfg.policies, Path.is_dir, "folder")
    spool = cfg.audit.get("spool_dir")
    if isinstance(spool, str | Path):  # else AuditSettings names the bad value
        # Against the config's folder, as every other path here: resolved against the working directory,
        # a restart from elsewhere would open an empty spool and leave the spooled records behind.
        updates["audit"] = {**cfg.audit, "spool_dir": located_path(("audit", "spool_dir"), spool, None, "")}
    if cfg.tls is not None:  # unreadable or unusable certificates: a located error now, not a failed start later
        from decision.tls import server_ssl_context

        files = {what: located_path(("tls", what), getattr(cfg.tls, what), Path.is_file, "file")
                 for what in ("cert_file", "key_file", "client_ca_file") if getattr(cfg.tls, what) is not None}
        updates["tls"] = cfg.tls.model_copy(update=files)
        try:
            server_ssl_context(updates["tls"])
        except ValueError as exc:  # names the field (tls.cert_file: cannot read ...) or the unusable pair
            field = str(exc).split(":", 1)[0]
            loc = tuple(field.split(".")) if field.startswith("tls.") else ("tls",)
            raise ConfigError(f"{p}:{doc.line_of(loc)}: {exc}") from None
    located = cfg.model_copy(update=updates)
    located._line_of = doc.line_of
    return located


def port_clash(grpc_port: int, http_port: int, extproc_port: int | None, workers: int = 1) -> str:
    """Why these ports cannot all be served ("" when they can); 0 (any free port) never clashes.

    Worker ``i`` of ``serve --workers N`` serves HTTP on ``http_port + i``; gRPC and ext_proc are
    shared by every worker. Two servers on one port would not fail to start under SO_REUSEPORT:
    the kernel would share the port's connections between them, and half the calls would find the
    wrong service.
    """
    https = [http_port + i for i in range(workers)] if http_port else []
    if https and https[-1] > 65535:
        return f"http_port {http_port} + {workers - 1} (one HTTP port per worker) is past 65535"
    if grpc_port and grpc_port == extproc_port:
        return f"grpc_port and extproc.port are both {grpc_port}"
    taken = {port: name for name, port in (("grpc_port", grpc_port), ("extproc.port", extproc_port)) if port}
    for port in https:
        if port in taken:
            which = "http_port" if port == http_port else f"worker {port - http_port}'s HTTP port {port}"
            return f"{which} is also {taken[port]} {port}"
    return ""


def _error_line(p: Path, line: int | None, loc: Sequence[str | int], message: str) -> str:
    """``file:line: field: message`` (``file: field: message`` when the line is not known)."""
    at = f":{line}" if line is not None else ""
    return f"{p}{at}: {'.'.join(map(str, loc))}: {message}"


def _located(p: Path, doc: LocatedYaml, exc: ValidationError, prefix: tuple[str, ...]) -> str:
    """One ``file:line: field: message`` line per validation error."""
    lines = []
    for e in exc.errors():
        loc: tuple[str | int, ...] = prefix + tuple(e["loc"])  # list indices stay ints: the line map's keys
        lines.append(_error_line(p, doc.line_of(loc), loc, e["msg"]))
    return "\n".join(lines)


def _check_audit_section(p: Path, doc: LocatedYaml, audit: dict[str, Any]) -> None:
    """The ``audit:`` section is the audit package's settings (plus ``enabled``), checked here so that a bad
    value is reported with its line at load time rather than as a failed start."""
    from audit.settings import AuditSettings

    enabled = audit.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{p}:{doc.line_of(('audit', 'enabled'))}: audit.enabled: Input should be a valid "
                          f"boolean (true or false), not {enabled!r}")
    try:
        environment = AuditSettings.environment()
    except SettingsError as exc:  # a list setting's variable that is not JSON; pydantic-settings names its field
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"INFERMESH_AUDIT_{field[1].upper()}" if field else "INFERMESH_AUDIT_*"
        raise ConfigError(f"environment {name}: not JSON (a list is given as JSON, e.g. [\"request_id\"])") from None
    try:
        AuditSettings.from_section(audit, environment=environment)  # as the service builds them
    except ValidationError as exc:
        from_env = [e for e in exc.errors() if e["loc"] and str(e["loc"][0]) in environment]
        if from_env:  # INFERMESH_AUDIT_<KEY> wins over the section's key: the bad value is the variable's
            e = from_env[0]
            raise ConfigError(f"environment INFERMESH_AUDIT_{str(e['loc'][0]).upper()}: {e['msg']}") from None
        raise ConfigError(_located(p, doc, exc, ("audit",))) from None


def load_settings() -> Settings:
    """The ``INFERMESH_*`` environment; a bad value is a :class:`ConfigError` naming its variable."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "INFERMESH_" + "_".join(str(x) for x in first["loc"]).upper()
        raise ConfigError(f"environment: {name}: {first['msg']}") from None
