"""Reading and writing images, meshes and Gaussian PLY files."""
