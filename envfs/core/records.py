"""The base of every typed record envfs writes or prints (pydantic): unknown fields are
ignored (older readers of newer files), records are frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)
