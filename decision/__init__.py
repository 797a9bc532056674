"""InferMesh decision service: the pipeline, its domain and its front ends."""
