"""`python -m monofast` (and `torchrun -m monofast`): the command line."""

from monofast.cli import main

if __name__ == "__main__":  # not when a spawned worker process imports this module
    raise SystemExit(main())
