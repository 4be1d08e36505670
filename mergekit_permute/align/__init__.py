"""Statistics or weights -> an Alignment: the pipeline, solving, weight matching, learned maps,
REPAIR, N models."""
