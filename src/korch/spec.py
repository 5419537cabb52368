"""The base of every typed spec section: frozen, strict, unknown keys refused, docstrings become field docs.

Kept apart from `korch.config` so a task module can declare its options section without importing the job
spec (which imports the task registry).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)
