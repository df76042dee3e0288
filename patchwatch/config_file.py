"""``--config FILE.toml``: the fit settings of ``fit``, ``evaluate`` and ``deploy`` in one file.

A key is an option's long name (``input_scale`` or ``input-scale``); a value has the option's
type (``layers`` and ``context_scales`` also as lists of numbers). The file's values become the
command's defaults, so an option given on the command line overrides them. The file is checked
whole before anything runs; the first problem is refused in one line naming the file and the key.

What a fit resolved (file, command line, defaults) is recorded in the version's manifest as
``settings``, the file itself as ``config_file`` (path, SHA-256, its values): a nightly re-fit
deployed with the same file provably fits as the tested ``fit`` did.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tomllib

# What a configuration file may set: what shapes a fit (the model, the threshold) and how it runs.
# Locations (--images, --root, ...) and one-off choices (--full, --split) stay on the command line.
SETTING_KEYS = ("detector", "backbone", "layers", "input_scale", "square_side", "embed_dim", "context_scales",
                "mirrors", "coreset_ratio", "auto", "holdout_fraction", "threshold_quantile", "batch_size", "runtime",
                "device", "workers", "dask_address", "allow_sources")
# options written comma-separated on the command line: a TOML list of their items is accepted too
LIST_KEYS = {"layers": "numbers", "context_scales": "numbers", "mirrors": "names (h, v, hv)"}


def _is_list_item(items: str, value) -> bool:
    if items == "numbers":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


class ConfigFileError(ValueError):
    """A configuration file that cannot be used: one line naming the file, the key and why."""


def read_config(path: str, parser: argparse.ArgumentParser) -> tuple[dict, dict]:
    """(values as the command's option destinations, record for the manifest) of the TOML file at
    ``path``, checked against the options of ``parser`` (one subcommand's parser)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ConfigFileError(f"{path}: {error.strerror or error}") from None
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigFileError(f"{path}: not a valid TOML file: {error}") from None
    actions = {action.dest: action for action in parser._actions if action.dest in SETTING_KEYS}
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in actions:
            reason = ("a location or one-off choice: give it on the command line" if _is_option(parser, name)
                      else "unknown setting")
            raise ConfigFileError(f"{path}: key {key!r}: {reason}; the file may set "
                                  f"{', '.join(k for k in SETTING_KEYS if k in actions)}")
        if name in values:
            raise ConfigFileError(f"{path}: key {key!r}: given twice (as {name} and {name.replace('_', '-')})")
        values[name] = _checked(path, key, value, actions[name])
    record = {"path": os.path.abspath(path), "sha256": hashlib.sha256(data).hexdigest(), "values": values}
    return values, record


def _is_option(parser: argparse.ArgumentParser, name: str) -> bool:
    return any(action.dest == name for action in parser._actions if action.option_strings)


def _checked(path: str, key: str, value, action: argparse.Action):
    """``value`` as the option would have parsed it, or ConfigFileError saying what was expected."""
    def refuse(expected: str):
        return ConfigFileError(f"{path}: key {key!r}: expected {expected}, got {value!r} ({_toml_type(value)})")

    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise refuse("true or false")
        return value
    if isinstance(value, bool):  # TOML's true is no number and no name
        raise refuse(_expected(action))
    if action.dest in LIST_KEYS and isinstance(value, list):
        if not all(_is_list_item(LIST_KEYS[action.dest], v) for v in value):
            raise refuse(f"a list of {LIST_KEYS[action.dest]}")
        value = ",".join(str(v) for v in value)  # the command's own comma-separated form
    if action.type is int:
        if not isinstance(value, int):
            raise refuse("a whole number")
    elif action.type is float:
        if not isinstance(value, (int, float)):
            raise refuse("a number")
        value = float(value)
    elif not isinstance(value, str):
        raise refuse(_expected(action))
    if action.choices is not None and value not in action.choices:
        raise refuse(f"one of {', '.join(map(str, action.choices))}")
    return value


def _expected(action: argparse.Action) -> str:
    if action.choices is not None:
        return f"one of {', '.join(map(str, action.choices))}"
    if action.dest in LIST_KEYS:
        return f"a comma-separated string or a list of {LIST_KEYS[action.dest]}"
    return {int: "a whole number", float: "a number"}.get(action.type, "a string")


def _toml_type(value) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def apply_config(parser: argparse.ArgumentParser, command_parser: argparse.ArgumentParser,
                 argv: list[str], args: argparse.Namespace) -> argparse.Namespace:
    """``args`` again with the file of ``--config`` as the command's defaults: the options given
    in ``argv`` override it. ``args.config_file`` is the file's record (None without a file)."""
    if not getattr(args, "config", None):
        args.config_file = None
        return args
    values, record = read_config(args.config, command_parser)
    command_parser.set_defaults(**values)
    args = parser.parse_args(argv)
    args.config_file = record
    return args


def resolved_settings(args: argparse.Namespace) -> dict:
    """The settings a command resolved (file, command line, defaults), as the file would name them."""
    return {key: getattr(args, key) for key in SETTING_KEYS if hasattr(args, key)}
