"""Structured JSON logs: one object a line, carrying decision_id and trace id when known."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

decision_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("decision_id", default="")
trace_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        did = getattr(record, "decision_id", "") or decision_id_var.get()
        tid = getattr(record, "trace_id", "") or trace_id_var.get()
        if did:
            out["decision_id"] = did
        if tid:
            out["trace_id"] = tid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
