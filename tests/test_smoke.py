"""The package imports and the CLI answers."""

from tune_sana.cli import main


def test_cli_help_exits_zero(capsys: object) -> None:
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
