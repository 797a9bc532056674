"""Audit configuration: one settings class, read once, validated at start-up (fails fast)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict


class AuditSettings(BaseSettings):
    """Settings of the audit log, from ``INFERMESH_AUDIT_*`` environment variables.

    The service builds them with :meth:`from_section`, from the config's ``audit:`` section under
    the environment: ``INFERMESH_AUDIT_<KEY>`` wins over the section's ``<key>``. Arguments given
    to the class itself win over the environment (the writer process rebuilds its parent's
    resolved settings that way).

    Attributes
    ----------
    queue_max : int
        Bound of the in-memory queue between the request path and the writer.
    batch_size : int
        Rows per COPY batch (flush on size).
    flush_interval_s : float
        Longest time an event waits in the queue before a flush (flush on interval).
    spool_dir : Path
        Directory of the durable local spool used while PostgreSQL is unreachable.
    spool_max_bytes : int
        Bound on the spool. At the bound, ``on_spool_full`` decides.
    on_spool_full : {"fail_closed", "fail_open"}
        ``fail_closed`` refuses decisions (``Unavailable``); ``fail_open`` drops and counts them.
    mask_fields : list of str
        Dotted paths masked before anything is written, e.g. ``request_id``, ``labels.user``,
        ``session_id``. A ``labels.*`` path masks every label.
    mask_mode : {"hash", "remove"}
        Keyed hash (HMAC-SHA256) or removal of masked values.
    mask_key : str
        Key of the masking HMAC.
    writer : {"process", "thread"}
        Where the writer runs: a process of its own (``audit.writer_process``, the default: the
        service's interpreter only hands records over) or a thread of the service.
    writer_nice : int
        Niceness of the writer process (``audit.writer_process``): when CPU is short, decisions
        go first and the queue (then the spool) absorbs the writer's lag.
    retention_days : int
        Days kept (today included): the service drops older day partitions, with their outcomes,
        at start and every ``upkeep_interval_s`` (``audit.upkeep``); 0 keeps everything.
    partitions_ahead_days : int
        Day partitions created ahead of time (at start and every ``upkeep_interval_s``).
    upkeep_interval_s : float
        How often the service creates partitions ahead and applies retention.
    """

    # No NaN or infinity anywhere (an infinite flush interval killed the writer thread), and bounds
    # on what a service can use: a day count past a few thousand years overflows a date.
    model_config = SettingsConfigDict(env_prefix="INFERMESH_AUDIT_", extra="forbid", allow_inf_nan=False)

    queue_max: int = Field(default=100_000, ge=1, le=100_000_000)
    batch_size: int = Field(default=2_000, ge=1, le=1_000_000)
    flush_interval_s: float = Field(default=0.2, gt=0, le=3600)
    retry_interval_s: float = Field(default=1.0, gt=0, le=3600)
    connect_timeout_s: int = Field(default=2, ge=1, le=3600)
    statement_timeout_ms: int = Field(default=10_000, ge=100, le=3_600_000)
    drain_timeout_s: float = Field(default=30.0, ge=0, le=86_400)
    spool_dir: Path = Path("var/audit-spool")
    spool_segment_bytes: int = Field(default=16 << 20, ge=1024)
    spool_max_bytes: int = Field(default=1 << 30, ge=1024)
    on_spool_full: Literal["fail_closed", "fail_open"] = "fail_closed"
    mask_fields: list[str] = Field(default_factory=list)
    mask_mode: Literal["hash", "remove"] = "hash"
    mask_key: str = "infermesh-audit"
    retention_days: int = Field(default=90, ge=0, le=36_500)
    partitions_ahead_days: int = Field(default=3, ge=1, le=366)
    upkeep_interval_s: float = Field(default=3600.0, gt=0, le=86_400)
    writer: Literal["process", "thread"] = "process"
    # The writer process's niceness (0-19): when CPU is short, decisions go first.
    writer_nice: int = Field(default=10, ge=0, le=19)
    # How the writer compresses stored traces (audit.trace_store): an lz4 frame (default; compressed in
    # the writer, rows stay out of TOAST), zlib at compress_level, or "json": uncompressed, as they are
    # (the parts form, or JSON for a trace that arrives built), left to PostgreSQL (see migration 0003).
    trace_codec: Literal["lz4", "zlib", "json"] = "lz4"
    compress_level: int = Field(default=1, ge=1, le=9)

    @field_validator("mask_fields")
    @classmethod
    def _known_paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or any(not part for part in p.split(".")):
                raise ValueError(f"bad mask path {p!r}")
        return v

    @classmethod
    def environment(cls) -> dict[str, Any]:
        """The settings the ``INFERMESH_AUDIT_<KEY>`` variables set, by key, as read (not validated).

        Raises
        ------
        pydantic_settings.SettingsError
            A variable of a list setting (``INFERMESH_AUDIT_MASK_FIELDS``) that is not JSON.
        """
        return EnvSettingsSource(cls)()

    @classmethod
    def from_section(cls, section: Mapping[str, Any], *,
                     environment: Mapping[str, Any] | None = None) -> AuditSettings:
        """The settings of a config's ``audit:`` section, with the environment winning over it.

        The usual order (a file gives the defaults of a deployment, each process's environment
        overrides them), as ``INFERMESH_REPLICA`` over ``learner.replica``. A setting that neither
        gives is left out of ``model_fields_set``.

        Parameters
        ----------
        section
            The ``audit:`` section: keys of this class, plus ``enabled`` (not a setting: ignored).
        environment
            What :meth:`environment` answered, when the caller read it already.

        Raises
        ------
        pydantic.ValidationError
            A bad value or an unknown key; a value whose key is in :meth:`environment` came from there.
        """
        from_file = {k: v for k, v in section.items() if k != "enabled"}
        return cls(**{**from_file, **(cls.environment() if environment is None else environment)})
