"""3D representations optimised by SIR."""
