"""TLS and mutual TLS for the gRPC servers (DecisionService and the Envoy ext_proc port).

Certificates come from PEM files named in the ``tls:`` section of the service config; relative
paths resolve against the config file's folder. With ``client_ca_file`` set and
``require_client_cert`` true (the default then), a client must present a certificate signed by
that CA or the handshake fails. Any grpcio server, sync or ``grpc.aio``, takes the credentials:
``server.add_secure_port(address, server_credentials(tls, base))``; asyncio servers (the grpclib
ext_proc server) take :func:`server_ssl_context` instead.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated

import grpc
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TlsConfig(BaseModel):
    """The ``tls:`` config section."""

    model_config = ConfigDict(extra="forbid", strict=True)  # as decision.config's sections

    cert_file: Annotated[Path, Field(strict=False)]  # written as text in YAML
    key_file: Annotated[Path, Field(strict=False)]
    client_ca_file: Annotated[Path, Field(strict=False)] | None = None
    require_client_cert: bool | None = None

    @model_validator(mode="after")
    def _mtls_needs_a_ca(self) -> TlsConfig:
        if self.require_client_cert and self.client_ca_file is None:
            raise ValueError("require_client_cert needs client_ca_file")
        return self

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate (default: yes when a client CA is given)."""
        return self.client_ca_file is not None if self.require_client_cert is None else self.require_client_cert


def _resolve(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else base / path


def _read(path: Path, base: Path, what: str) -> bytes:
    p = _resolve(path, base)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise ValueError(f"tls.{what}: cannot read {p}: {exc.strerror}") from None


def server_credentials(tls: TlsConfig, base: Path = Path(".")) -> grpc.ServerCredentials:
    """Server credentials from the configured files; ``ValueError`` names the unreadable one.

    Parameters
    ----------
    tls : TlsConfig
        The ``tls:`` section.
    base : Path
        The folder relative paths resolve against (the config file's).
    """
    cert = _read(tls.cert_file, base, "cert_file")
    key = _read(tls.key_file, base, "key_file")
    ca = _read(tls.client_ca_file, base, "client_ca_file") if tls.client_ca_file is not None else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=tls.mutual)


def server_ssl_context(tls: TlsConfig, base: Path = Path(".")) -> ssl.SSLContext:
    """The same certificates as an :class:`ssl.SSLContext` for asyncio servers (grpclib), ALPN ``h2``.

    ``ValueError`` names the unreadable or unusable file. With a client CA, client certificates are
    required when ``tls.mutual``, as :func:`server_credentials` does. With ``require_client_cert:
    false`` a client may present none, but one it presents must be signed by that CA (grpcio
    asks for one then and accepts any).
    """
    for what in ("cert_file", "key_file", "client_ca_file"):
        if getattr(tls, what) is not None:
            _read(getattr(tls, what), base, what)  # readable, or a ValueError naming the field
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # HTTP/2 needs 1.2 or later (RFC 9113, 9.2)
    try:
        ctx.load_cert_chain(_resolve(tls.cert_file, base), _resolve(tls.key_file, base))
        if tls.client_ca_file is not None:
            ctx.load_verify_locations(_resolve(tls.client_ca_file, base))
            ctx.verify_mode = ssl.CERT_REQUIRED if tls.mutual else ssl.CERT_OPTIONAL
    except ssl.SSLError as exc:
        raise ValueError(f"tls: cannot use the certificate files: {exc}") from None
    ctx.set_alpn_protocols(["h2"])
    return ctx


def channel_credentials(ca_file: Path, cert_file: Path | None = None,
                        key_file: Path | None = None) -> grpc.ChannelCredentials:
    """Client credentials: trust ``ca_file``; present ``cert_file``/``key_file`` for mutual TLS."""
    cert = cert_file.read_bytes() if cert_file is not None else None
    key = key_file.read_bytes() if key_file is not None else None
    return grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes(), private_key=key,
                                        certificate_chain=cert)
