"""Base class for every section of the typed config tree.

Every section forbids unknown keys and validates on assignment, so a typo in a
YAML file or a dotted override is an error that names the key instead of a
silently ignored setting.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A node of the config tree: strict keys, validated assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
