"""``python -m assign``: the same commands as ``mmc4-assign``."""

from crawler import early

if __name__ == "__main__":
    early.install()  # a SIGTERM while importing is remembered and honoured, not fatal
    from assign.cli import main

    main()
