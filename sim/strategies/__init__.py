"""Routing strategies: the whitepaper's seven, strong peers, and the real InferMesh pipeline."""
