"""Benchmark-only peers (installed so `infermesh sim` finds them; vowpalwabbit comes with the `bench` extra)."""
