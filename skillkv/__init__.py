"""skillkv: compile Agent Skills once into KV-cache snapshots, answer by prefilling only the question."""

__version__ = "0.1.0"

from skillkv.errors import SkillkvError  # noqa: E402

__all__ = ["SkillkvError", "__version__"]
