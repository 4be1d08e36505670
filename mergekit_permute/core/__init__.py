"""The pieces every alignment is made of: transforms, head permutations, assignment solvers,
the symmetry check, the Alignment type and its files."""
