"""``python -m crawler`` and the ``mmc4-crawl`` entry point."""

from core.early import EntryPoint

main = EntryPoint("crawler.cli")

if __name__ == "__main__":
    main()
