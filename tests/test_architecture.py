"""The layering contract (pyproject's [tool.importlinter]) and the `mllm` command's surface."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_are_kept():
    result = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_lists_the_subcommands_that_exist():
    result = subprocess.run([sys.executable, "-m", "mllm.cli", "--help"], capture_output=True, text=True, check=True)
    listed = [line.split()[0] for line in result.stdout.split("COMMAND\n", 2)[-1].splitlines() if line.startswith("    ") and line[4] != " "]
    assert listed == ["demo", "default", "data", "tokenize", "finetune", "export", "eval", "list", "bench", "chat", "serve"]
    for command in listed:
        sub = subprocess.run([sys.executable, "-m", "mllm.cli", command, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0, sub.stderr


def test_no_top_level_folder_shadows_a_package():
    """`tokenizers/`, `data/`, ... hold configs: an __init__.py there would shadow HF `tokenizers`."""
    for folder in ("tokenizers", "data", "finetune", "eval", "bench"):
        assert not (ROOT / folder / "__init__.py").exists()


def test_list_shows_every_registry():
    result = subprocess.run([sys.executable, "-m", "mllm.cli", "list"], capture_output=True, text=True, check=True)
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert "patch" in lines["media tokenizers"].split(", ") and "patch" in lines["de-tokenizers"].split(", ")
    assert lines["chat templates"] == "chatml, mistral, plain"


def test_overrides_may_follow_options_and_stray_words_are_refused(monkeypatch, capsys):
    from mllm import cli

    seen = {}
    monkeypatch.setattr(cli, "_tokenize", lambda args: seen.update(overrides=args.overrides) or 0)
    assert cli.main(["tokenize", "train", "r.yaml", "a=1", "--out", "d", "b.c=2"]) == 0
    assert seen["overrides"] == ["a=1", "b.c=2"]
    for stray in ("--bogus", "stray"):
        with pytest.raises(SystemExit):
            cli.main(["tokenize", "train", "r.yaml", "--out", "d", stray])
        assert f"unrecognized arguments: {stray}" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a command without overrides takes none
        cli.main(["list", "x=1"])


@pytest.mark.parametrize("argv, message", [
    (["chat", "--message", "hi", "--temperature", "-1"], "argument --temperature: expected a number >= 0, got '-1'"),
    (["chat", "--message", "hi", "--max-tokens", "0"], "argument --max-tokens: expected a whole number >= 1, got '0'"),
    (["eval", "--tasks", "vqav2_proxy", "--out", "x", "--limit", "-3"], "argument --limit: expected a whole number >= 1"),
    (["eval", "--tasks", "vqav2_proxy", "--out", "x", "--batch-size", "0"], "argument --batch-size: expected a whole"),
    (["data", "build", "--limit", "-1"], "argument --limit: expected a whole number >= 1, got '-1'"),
    (["tokenize", "decode", "--detokenizer", "d", "--out", "o", "--steps", "0", "t"], "argument --steps: expected"),
    (["serve", "--port", "70000"], "argument --port: expected a port from 1 to 65535, got '70000'"),
])
def test_a_number_out_of_range_is_refused_by_the_parser_naming_its_flag(argv, message, capsys):
    """Before any work: argparse's one line and status 2, not a traceback after the model has loaded."""
    from mllm import cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_wrong_input_is_one_line_naming_it_and_exit_status_2(tmp_path, monkeypatch, capsys):
    """A config, a path or a name the user got wrong: `mllm <command>: <what>`, no traceback; a bug keeps its own.
    Ctrl-C is one line too, with the shell's status for it (130)."""
    from mllm import cli
    from mllm.config import ConfigError

    (tmp_path / "bad.yaml").write_text("model:\n  base: [1, 2\n")
    cases = {
        ("finetune", str(tmp_path / "bad.yaml")): "mllm finetune: " + f"{tmp_path / 'bad.yaml'}:3:1: invalid YAML",
        ("finetune", str(tmp_path / "none.yaml")): f"mllm finetune: {tmp_path / 'none.yaml'}: cannot read config",
        ("data", "build", "--only", "nosuch", "--out", str(tmp_path / "c")): "mllm data build: unknown corpus 'nosuch'",
        ("export", str(tmp_path), "--out", str(tmp_path / "e")): f"mllm export: {tmp_path}: not a complete step",
    }
    for argv, message in cases.items():
        assert cli.main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(message) and "Traceback" not in err, err
    monkeypatch.setattr(cli, "_list", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["list"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_list", interrupted)
    assert cli.main(["list"]) == 130 and capsys.readouterr().err == "\nmllm list: interrupted\n"
    monkeypatch.setenv("MLLM_TRACEBACK", "1")
    with pytest.raises(ConfigError, match="invalid YAML"):
        cli.main(["finetune", str(tmp_path / "bad.yaml")])


def test_the_override_examples_in_the_cli_help_apply():
    # `digits.per_class.train=10` (a null section) and `steps=500` (no such key) failed as the help showed them
    import re

    from mllm.cli import build_parser
    from mllm.data.corpora.build import load_build_config
    from mllm.tokenize.recipes import load_recipe

    def example(*argv: str) -> str:
        parser = build_parser()
        for name in argv:
            parser = next(a for a in parser._actions if a.dest.endswith("command")).choices[name]
        (action,) = [a for a in parser._actions if a.dest == "overrides"]
        return re.search(r"e\.g\. (\S+=\S+)", action.help).group(1)

    load_build_config(ROOT / "data" / "build.yaml", [example("data", "build")])
    load_recipe(ROOT / "tokenizers" / "image_fsq_tiny.yaml", [example("tokenize", "train")])
