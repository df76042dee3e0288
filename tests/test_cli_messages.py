"""What a user sees of the commands that need no run: --version, one-line errors naming the
location and the fix (no traceback), models on a missing root, promote of a version that does
not exist. Subprocesses (the CLI sets process-wide logging variables); none starts Prefect."""
from __future__ import annotations

import subprocess

from patchwatch import __version__

from .servers import patchwatch_command, patchwatch_env


def _patchwatch(args: list, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(patchwatch_command() + [str(a) for a in args], env=patchwatch_env(tmp_path / "home"),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_version(tmp_path):
    done = _patchwatch(["--version"], tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"patchwatch {__version__}", done


def test_missing_images_one_line_naming_it(tmp_path):
    missing = tmp_path / "no-such-folder"
    done = _patchwatch(["fit", "--images", missing, "--root", tmp_path / "model"], tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "--images" in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "model").exists()  # nothing ran
    # --debug: the traceback
    done = _patchwatch(["fit", "--images", missing, "--root", tmp_path / "model", "--debug"], tmp_path)
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_models_on_a_missing_root(tmp_path):
    done = _patchwatch(["models", "--root", tmp_path / "typo"], tmp_path)
    assert done.returncode != 0 and not done.stdout.strip(), done
    assert done.stderr.count("\n") == 1 and str(tmp_path / "typo") in done.stderr, done.stderr
    (tmp_path / "empty").mkdir()
    done = _patchwatch(["models", "--root", tmp_path / "empty"], tmp_path)
    assert done.returncode != 0 and "no model versions" in done.stderr, done


def test_promote_of_a_version_that_does_not_exist(tmp_path):
    for version in ("v0001", "v0002"):
        (tmp_path / "model" / "versions" / version).mkdir(parents=True)
    done = _patchwatch(["promote", "v0009", "--root", tmp_path / "model"], tmp_path)
    assert done.returncode != 0, done
    assert done.stderr.count("\n") == 1, done.stderr
    assert "no such version v0009" in done.stderr and "v0001, v0002" in done.stderr, done.stderr


def test_every_command_has_a_description_and_an_example(tmp_path):
    from patchwatch.cli import EXAMPLES, build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == set(EXAMPLES)
    for name, parser in commands.items():
        text = parser.format_help()
        assert parser.description and "example:" in text and f"patchwatch {name}" in text, text
