"""``python -m assign``: the same commands as ``mmc4-assign``."""

from crawler.early import assign_main

if __name__ == "__main__":
    assign_main()
