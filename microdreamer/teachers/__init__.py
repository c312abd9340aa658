"""Teachers: pre-trained (multi-view) diffusion models, or a ground-truth mesh, behind one interface."""
