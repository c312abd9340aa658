"""Differentiable renderers, one functional signature per primitive, with interchangeable backends."""
