"""Multi-view generators: a condition image → a fixed set of views at fixed poses (not SIR teachers, which
must denoise renders from any camera)."""
