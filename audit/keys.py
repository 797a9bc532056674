"""API keys (stored as SHA-256 only) and the API access log.

A key reads ``imk_<key id>_<secret part>``: the key id (8 hex digits) names it in ``api_keys``,
``api_access_log``, ``audit keys list`` and ``audit keys revoke``; the whole key is shown once, at
creation, and only its hash is kept.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import psycopg

ROLES = ("auditor", "admin")
PREFIX = "imk_"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a key id, its role and, for a tenant-scoped key, the one tenant it may read."""

    key_id: str
    role: str
    tenant: str | None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One row of ``api_keys`` as ``audit keys list`` shows it: never the hash."""

    key_id: str
    name: str
    role: str
    tenant: str | None  # None: every tenant
    created_at: dt.datetime
    revoked_at: dt.datetime | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601 strings, ``tenant`` and ``revoked_at`` ``null`` when unset."""
        return {"key_id": self.key_id, "name": self.name, "role": self.role, "tenant": self.tenant,
                "created_at": self.created_at.isoformat(),
                "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat()}


def create_key(conn: psycopg.Connection[Any], *, name: str, role: str, tenant: str | None = None) -> str:
    """Create a key and return its secret (shown once; only its hash is stored).

    The key id is part of the secret: :func:`key_ref` reads it back.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    key_id = secrets.token_hex(4)
    secret = f"{PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
    conn.execute("INSERT INTO api_keys (key_id, key_hash, name, role, tenant) VALUES (%s, %s, %s, %s, %s)",
                 (key_id, hash_key(secret), name, role, tenant))
    return secret


def key_ref(text: str) -> tuple[str, str | None]:
    """The key id ``text`` names, and the whole key when ``text`` is one.

    ``text`` is a key id (``4a648feb``), the key's printed prefix (``imk_4a648feb``) or the whole key.

    Parameters
    ----------
    text : str
        What the operator typed.

    Returns
    -------
    tuple of (str, str or None)
        The key id, and ``text`` itself when it is a whole key (else ``None``).

    Raises
    ------
    ValueError
        ``text`` names no key id (empty, or ``imk_`` with nothing after it). The message never
        repeats ``text``, which may be a secret.

    Examples
    --------
    >>> key_ref("4a648feb")
    ('4a648feb', None)
    >>> key_ref("imk_4a648feb")
    ('4a648feb', None)
    >>> key_ref("imk_4a648feb_Zm9v-YmFy")
    ('4a648feb', 'imk_4a648feb_Zm9v-YmFy')
    """
    text = text.strip()
    if not text.startswith(PREFIX):
        if not text:
            raise ValueError("no key id given")
        return text, None
    # The id is hex, so the first "_" after the prefix ends it; the secret part may hold more.
    key_id, sep, rest = text[len(PREFIX):].partition("_")
    if not key_id:
        raise ValueError(f"no key id after {PREFIX!r}")
    return key_id, (text if sep and rest else None)


def get_key(conn: psycopg.Connection[Any], *, key_id: str) -> KeyInfo | None:
    """The key ``key_id``, revoked or not, or ``None``."""
    rows = _key_rows(conn, "WHERE key_id = %s", (key_id,))
    return rows[0] if rows else None


def list_keys(conn: psycopg.Connection[Any]) -> list[KeyInfo]:
    """Every key, revoked ones too, oldest first."""
    return _key_rows(conn, "", ())


def _key_rows(conn: psycopg.Connection[Any], where: str, params: tuple[Any, ...]) -> list[KeyInfo]:
    rows = conn.execute("SELECT key_id, name, role, tenant, created_at, revoked_at FROM api_keys "
                        f"{where} ORDER BY created_at, key_id", params).fetchall()
    out = []
    for row in rows:
        r = tuple(row.values()) if isinstance(row, dict) else tuple(row)
        out.append(KeyInfo(str(r[0]), str(r[1]), str(r[2]), r[3], r[4], r[5]))
    return out


def revoke_key(conn: psycopg.Connection[Any], *, key_id: str, secret: str | None = None) -> bool:
    """Revoke the active key ``key_id``; with ``secret``, only if that is its key. ``False`` if nothing was."""
    if secret is None:
        cur = conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s AND revoked_at IS NULL",
                           (key_id,))
    else:  # the whole key was given: revoke that key, not whatever else a mistyped one's id names
        cur = conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s AND key_hash = %s "
                           "AND revoked_at IS NULL", (key_id, hash_key(secret)))
    return cur.rowcount == 1


def lookup(conn: psycopg.Connection[Any], *, secret: str) -> Principal | None:
    row = conn.execute("SELECT key_id, role, tenant FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL",
                       (hash_key(secret),)).fetchone()
    if row is None:
        return None
    if isinstance(row, dict):
        return Principal(str(row["key_id"]), str(row["role"]), row["tenant"])
    return Principal(str(row[0]), str(row[1]), row[2])


def log_access(conn: psycopg.Connection[Any], *, principal: Principal | None, method: str, path: str,
               query: str, status: int, client: str) -> None:
    conn.execute(
        "INSERT INTO api_access_log (key_id, role, method, path, query, status, client) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (principal.key_id if principal else None, principal.role if principal else None, method,
         _storable(path), _storable(query), status, _storable(client)))


def _storable(text: str) -> str:
    """As PostgreSQL can store it: a NUL (a decoded ``%00``) would make the INSERT fail and the
    access go unlogged, so a caller probing keys could hide in it. Escaped, and capped."""
    return text.replace("\x00", "\\x00")[:2000]
