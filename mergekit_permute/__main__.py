"""`python -m mergekit_permute ...` (the same commands as `mergekit-permute`); the entry point
for multi-GPU / multi-node runs: `torchrun --nproc-per-node N -m mergekit_permute align ...`."""

import sys

from mergekit_permute.cli import main

if __name__ == "__main__":
    sys.exit(main())
