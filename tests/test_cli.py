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


def _one_line_error(capsys, argv: list[str], expected_code: int) -> str:
    assert octjepa_cli.main(argv) == expected_code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith(f"octjepa {argv[0]}: "), err
    return err


def test_a_folder_without_index_is_one_line_for_every_reader(tmp_path, capsys):
    empty = str(tmp_path / "not_a_set")
    (tmp_path / "not_a_set").mkdir()
    for argv in (
        ["verify", empty],
        ["preview", "--shards", empty, "--out", str(tmp_path / "p.png")],
        ["embed", "--checkpoint", str(tmp_path / "none.pt"), "--shards", empty, "--out", str(tmp_path / "e.npz")],
        ["reshard", "--input", empty, "--output", str(tmp_path / "out")],
    ):
        err = _one_line_error(capsys, argv, 1)
        assert "index.json" in err or "none.pt" in err, err


def test_user_errors_become_one_line_and_their_exit_code(capsys):
    from shards.errors import OctjepaError

    class Boom(OctjepaError):
        exit_code = 3

    def fail(argv):
        raise Boom("first line\n  second line")

    octjepa_cli.COMMANDS["boom"] = ("tests.test_cli", "_boom", "")
    globals()["_boom"] = fail
    try:
        assert _one_line_error(capsys, ["boom"], 3) == "octjepa boom: first line | second line"
    finally:
        del octjepa_cli.COMMANDS["boom"]
