"""microdreamer: one image or one prompt to a 3D asset with score-based iterative reconstruction (SIR)."""

__version__ = "0.1.0"
