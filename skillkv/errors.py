"""Errors a user can cause and fix. The CLI prints them as one line and exits non-zero."""


class SkillkvError(Exception):
    """A known, user-facing failure. `str(err)` is the whole message; `exit_code` the process status."""

    exit_code = 2


class SkillError(SkillkvError):
    """A skill folder or SKILL.md is missing or malformed."""


class ModelError(SkillkvError):
    """The model path or spec cannot be resolved or loaded."""


class StoreError(SkillkvError):
    """The snapshot store cannot be read or written."""


class SnapshotError(SkillkvError):
    """A snapshot is truncated, corrupted, stale or was made by another model. Never served; recompiled."""


class PromptTooLong(SkillkvError):
    """Skills plus question (plus answer budget) exceed the model's context window."""
