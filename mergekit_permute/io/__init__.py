"""What is read and written: checkpoints, model pairs, text, output directories, preflight
checks."""
