"""The simulator's own reading of the hard rules, written independently of the policy bundle.

One definition serves the audit that counts violations (``sim.engine``) and the guarded variants
of the peer strategies (``NAME+guard``), which route only where these rules allow.
"""

from __future__ import annotations

from sim.model import Request
from sim.world import World

DATA_CLASS_JURISDICTIONS: dict[str, frozenset[str]] = {"personal": frozenset({"EU"})}
DATA_CLASS_CERTIFICATIONS: dict[str, frozenset[str]] = {"phi": frozenset({"hipaa"})}


def breaks_rules(world: World, req: Request, node: int) -> bool:
    """Whether sending ``req`` to ``node`` breaks residency, data class or device ownership."""
    juris = world.jurisdiction[node]
    if req.jurisdictions and juris not in req.jurisdictions:
        return True
    dc = req.data_class
    if dc in DATA_CLASS_JURISDICTIONS and juris not in DATA_CLASS_JURISDICTIONS[dc]:
        return True
    if dc in DATA_CLASS_CERTIFICATIONS and not DATA_CLASS_CERTIFICATIONS[dc] <= world.certs[node]:
        return True
    owner = world.owner[node]
    return owner is not None and owner != req.tenant
