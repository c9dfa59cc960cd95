"""`python -m mvm_cuda ...` is the `mvm-cuda` command line (see mvm_cuda.eval.reproduce)."""
import sys

from .eval.reproduce import main

sys.exit(main())
