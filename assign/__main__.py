"""``python -m assign``: the same commands as ``mmc4-assign``."""

from assign.cli import main

if __name__ == "__main__":
    main()
