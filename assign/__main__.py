"""``python -m assign`` and the ``mmc4-assign`` entry point (the same commands as
``mmc4-crawl assign``): the early signal catch (core.early) first, then the CLI."""

from core import early


def main() -> None:
    early.install()
    from assign.cli import main as cli_main

    cli_main()


main.cli_module = "assign.cli"  # type: ignore[attr-defined]  # where the click group lives

if __name__ == "__main__":
    main()
