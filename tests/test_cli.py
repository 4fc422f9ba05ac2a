import pytest

from carvana.pipeline.settings import comments_of, parse_settings, settings_from

SOURCE = '''
EPOCHS = 8  # number of epochs
LR = 1e-3  # learning rate
INPUT_SIZE = "256x384"  # HxW
AMP = True  # mixed precision
lowercase = 3
'''


def defaults():
    ns = {}
    exec(SOURCE, ns)
    return settings_from(ns)


def test_settings_are_the_uppercase_values_in_order():
    assert list(defaults()) == ["EPOCHS", "LR", "INPUT_SIZE", "AMP"]


def test_overrides_keep_types_and_defaults():
    hp = parse_settings(defaults(), ["--epochs", "3", "--input-size", "512x768", "--no-amp"])
    assert (hp.epochs, hp.lr, hp.input_size, hp.amp) == (3, 1e-3, "512x768", False)
    assert isinstance(hp.epochs, int) and isinstance(hp.lr, float)


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_settings(defaults(), ["--epoch", "3"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_wrong_type_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_settings(defaults(), ["--epochs", "three"])
    assert "expected int" in capsys.readouterr().err


def test_help_shows_the_comments(capsys):
    with pytest.raises(SystemExit):
        parse_settings(defaults(), ["--help"], help_text=comments_of(SOURCE))
    assert "learning rate" in capsys.readouterr().out


def test_every_setting_in_main_py_has_a_comment():
    """Each setting's trailing comment is its --help text: none may be missing."""
    import runpy
    from pathlib import Path

    main = Path(__file__).resolve().parents[1] / "main.py"
    settings = settings_from(runpy.run_path(str(main), run_name="not_main"))
    comments = comments_of(main.read_text())
    assert len(settings) > 30
    assert [name for name in settings if not comments.get(name)] == []


def test_given_settings_are_those_typed_even_when_equal_to_the_default():
    from carvana.pipeline.settings import parse_command

    command = parse_command(defaults(), ["--epochs", "3", "--lr", "1e-3", "--no-amp"])
    assert command.given == {"epochs": "command line", "lr": "command line", "amp": "command line"}
    assert command.hp.epochs == 3 and command.recipe is None
