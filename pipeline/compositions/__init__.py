"""Compositions of stages: the demo, the paper's experiments and sweeps, each many stage runs in one command."""
