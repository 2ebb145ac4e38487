"""Ways to run a stage's unit of work: in this process (local) or across a cluster (ray)."""
