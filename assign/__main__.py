"""``python -m assign`` and the ``mmc4-assign`` entry point (the same commands as
``mmc4-crawl assign``)."""

from core.early import EntryPoint

main = EntryPoint("assign.cli")

if __name__ == "__main__":
    main()
