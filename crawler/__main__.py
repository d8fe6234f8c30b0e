"""``python -m crawler`` and the ``mmc4-crawl`` entry point: the early signal catch
(core.early) first, then the CLI and its heavy imports."""

from core import early


def main() -> None:
    early.install()
    from crawler.cli import main as cli_main

    cli_main()


main.cli_module = "crawler.cli"  # type: ignore[attr-defined]  # where the click group lives

if __name__ == "__main__":
    main()
