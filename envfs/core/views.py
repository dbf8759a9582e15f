"""The one type every layer passes around: a binding's revision, as the node's index
answers it and the namespace, the service and the faces read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BindingView:
    """One revision of a binding ``workflow/node`` and the snapshot it names."""

    workflow: str
    node: str
    revision: int
    snapshot_id: str
