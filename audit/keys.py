"""API keys (stored as SHA-256 only) and the API access log."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import psycopg

ROLES = ("auditor", "admin")


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


def create_key(conn: psycopg.Connection[Any], *, name: str, role: str, tenant: str | None = None) -> str:
    """Create a key and return its secret (shown once; only its hash is stored)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    key_id = secrets.token_hex(4)
    secret = f"imk_{key_id}_{secrets.token_urlsafe(24)}"
    conn.execute("INSERT INTO api_keys (key_id, key_hash, name, role, tenant) VALUES (%s, %s, %s, %s, %s)",
                 (key_id, hash_key(secret), name, role, tenant))
    return secret


def revoke_key(conn: psycopg.Connection[Any], *, key_id: str) -> bool:
    cur = conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s AND revoked_at IS NULL",
                       (key_id,))
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
