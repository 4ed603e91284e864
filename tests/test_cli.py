import importlib


import octjepa_cli


def test_every_subcommand_resolves_to_a_main():
    for name, (module, func, _) in octjepa_cli.COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), func)), name


def test_unknown_command_is_an_error(capsys):
    assert octjepa_cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert octjepa_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("synth", "preprocess", "train", "demo"):
        assert name in out
