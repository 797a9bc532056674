"""The learner store knows its own earlier sessions by a token in ``application_name``, not by backend pid.

Behind a session pooler one backend serves several clients in turn: a store that matched its old
sessions by (pid, backend start) ended whichever client the pooler had given its old backend to.
"""

from __future__ import annotations

import psycopg
import pytest

from learners.store import LearnerStore, ReplicaInUse, replica_lock_key
from tests.pg_pooler import SessionPooler
from tests.test_learners_support import migrate

KEY = {"learner": "linucb", "version": "1+f2-abc", "replica": "pod-a"}


def _app_name(url: str, pid: int) -> str | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return None if row is None else str(row[0])


def _holder_pid(url: str) -> int | None:
    key = replica_lock_key(KEY["learner"], KEY["version"], KEY["replica"]) & (2**64 - 1)
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s::oid"
                           " AND objid = %s::oid AND objsubid = 1", (key >> 32, key & 0xFFFF_FFFF)).fetchone()
    return None if row is None else int(row[0])


def test_a_backend_the_pooler_gave_another_client_is_not_ended_as_the_store_s_own(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    pooler = SessionPooler(fresh_pg_url)
    a = b = None
    try:
        a = LearnerStore(pooler.url())
        a.claim_replica(**KEY)
        backend = a._conn.info.backend_pid  # the pooler's backend, serving A for now
        pooler.drop_client()  # the pooler gave up on A's connection (A has not noticed) and reset the backend
        b = LearnerStore(pooler.url())  # another process, handed A's old backend
        assert b._conn.info.backend_pid == backend
        b.claim_replica(**KEY)  # the reset freed A's lock: the id is B's now
        with pytest.raises(psycopg.OperationalError):
            a.last_delta_seq(**KEY)  # A finds its connection broken
        with pytest.raises(ReplicaInUse, match="session was lost, and meanwhile another live process took"):
            a.claim_replica(**KEY)  # A reconnects (another backend) and would take its id again
        # B's session, on the backend that once was A's, lives on and holds the id.
        assert _holder_pid(fresh_pg_url) == backend
        assert b.last_delta_seq(**KEY) == 0
    finally:
        for store in (a, b):
            if store is not None:
                store.close()
        pooler.close()


def test_every_session_of_a_store_carries_its_token_after_the_name_it_was_given(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    first = LearnerStore(fresh_pg_url + "?application_name=pod-a%20sync")
    second = LearnerStore(fresh_pg_url)
    try:
        name = _app_name(fresh_pg_url, first._conn.info.backend_pid)
        assert name is not None and name.startswith("pod-a sync learners#")
        other = _app_name(fresh_pg_url, second._conn.info.backend_pid)
        assert other is not None and other.startswith("infermesh learners#") and other[-16:] != name[-16:]
        first._conn.close()  # a lost session: the next call reconnects under the same name
        first.last_delta_seq(**KEY)
        assert _app_name(fresh_pg_url, first._conn.info.backend_pid) == name
    finally:
        first.close()
        second.close()


def test_a_name_too_long_for_postgresql_is_cut_before_the_token(fresh_pg_url: str) -> None:
    store = LearnerStore(fresh_pg_url + "?application_name=" + "x" * 70)
    try:
        name = _app_name(fresh_pg_url, store._conn.info.backend_pid)
        assert name is not None and len(name) == 63 and name.startswith("xxx") and "learners#" in name
        assert name == store._app_name  # what the server keeps is what the store matches on
    finally:
        store.close()


def test_the_refusal_says_the_environment_s_id_takes_precedence_over_the_config_s(fresh_pg_url: str) -> None:
    """INFERMESH_REPLICA wins over learner.replica (decision.config.learner_replica): the message said the opposite."""
    first, second = LearnerStore(fresh_pg_url), LearnerStore(fresh_pg_url)
    try:
        first.claim_replica(**KEY)
        with pytest.raises(ReplicaInUse) as refused:
            second.claim_replica(**KEY)
        assert "set INFERMESH_REPLICA per process" in str(refused.value)
        assert "it takes precedence over learner.replica" in str(refused.value)
    finally:
        first.close()
        second.close()
