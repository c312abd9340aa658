"""Reconstructors: views of an object → 3D Gaussians in one network pass (LGM)."""
