"""microdreamer: one image or one prompt to a 3D asset with score-based iterative reconstruction (SIR).

The Python API (:mod:`microdreamer.api`): ``from microdreamer import Pipeline``.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["MeshResult", "Pipeline", "Progress", "ReconstructionResult", "UserError", "__version__"]


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (``microdreamer --help`` does not pay for torch)."""
    if name == "UserError":
        from .errors import UserError

        return UserError
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'microdreamer' has no attribute {name!r}")
