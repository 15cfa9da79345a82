"""A dataclass of `arg(default, help, domain)` fields as a strict command line, for train.py's Config.

Each field becomes --name, its help shows the default and the preset's value, booleans and choices are checked
by the parser, prefixes of flags are refused, and every value is checked against its domain before any work:
a bad one is one line naming the flag, its value and what is allowed, with exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import field


def arg(default, help: str, domain: tuple | str | None = None):
    """A Config field. domain: a tuple of choices, or ">= a", "> a", "[a, b]", "(a, b]", "[a, b)"."""
    return field(default=default, metadata={"help": help, "domain": domain})


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2: the usage of 45 flags would bury the message
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def parse(config_cls, presets: dict, groups: dict, argv=None, description: str = ""):
    """(config, parser): the preset named by --preset fills the defaults, explicit flags win."""
    first = Parser(add_help=False, allow_abbrev=False)  # the preset whose values --help shows
    first.add_argument("--preset", default=config_cls.preset)
    preset_name = first.parse_known_args(argv)[0].preset
    preset = presets.get(preset_name, {})  # an unknown one fails below, with the other flags' errors
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                    allow_abbrev=False, usage="%(prog)s [--flag value ...]")
    group = parser
    for f in dataclasses.fields(config_cls):
        group = parser.add_argument_group(groups[f.name]) if f.name in groups else group
        kind = {"bool": strict_bool, "int": int, "float": float}.get(str(f.type), str)
        extra = dict(nargs="?", const=True, metavar="true|false") if kind is strict_bool else {}
        domain = f.metadata["domain"]
        group.add_argument(f"--{f.name}", type=kind, default=None, help=flag_help(f, preset, preset_name),
                           choices=domain if isinstance(domain, tuple) else None, **extra)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return config_cls(**{**preset, **args}), parser, args


class ConfigError(ValueError):
    """A configuration the run refuses before any work: one line, exit status 2."""


def check_domains(cfg) -> None:
    """Every field's value within its domain (and finite), or a ConfigError naming the flag and its value."""
    for f in dataclasses.fields(cfg):
        value, domain = getattr(cfg, f.name), f.metadata["domain"]
        allowed = None
        if isinstance(value, float) and not math.isfinite(value):
            allowed = "must be a finite number"
        elif isinstance(domain, tuple) and value not in domain:
            allowed = f"must be one of {' | '.join(domain)}"
        elif isinstance(domain, str) and not in_range(value, domain):
            allowed = f"must be {domain}"
        if allowed:
            raise ConfigError(f"--{f.name} {value!r}: {allowed}")


def in_range(x: float, rule: str) -> bool:
    """x within a domain rule; NaN never is (every comparison with it is False)."""
    if rule[0] == ">":
        op, bound = rule.split()
        return x >= float(bound) if op == ">=" else x > float(bound)
    lo, hi = map(float, rule[1:-1].split(","))
    return (lo <= x if rule[0] == "[" else lo < x) and (x <= hi if rule[-1] == "]" else x < hi)


def strict_bool(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true | false | 1 | 0 | yes | no, got {text!r}")
    return value


def flag_help(f: dataclasses.Field, preset: dict, preset_name: str) -> str:
    """The field's help with its default and, when the preset sets it, the preset's value ('%' escaped)."""
    def shown(v):
        return repr(v) if isinstance(v, str) else v  # '' must stay visible
    text = f"{f.metadata['help']} (default: {shown(f.default)}"
    if f.name in preset:
        text += f"; {preset_name} preset: {shown(preset[f.name])}"
    return (text + ")").replace("%", "%%")
