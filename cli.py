"""The command line of train.py and sample.py: one --name value per field of a config dataclass.

    python train.py --help     # every option, its default and the comment beside its field
"""

import inspect
import re
import sys
from dataclasses import fields, is_dataclass


def parse_config(cls, argv: list[str]):
    """argv -> (cls(**given values), set of given names). A bool may stand alone (--chat)."""
    types = {f.name: f.type for f in fields(cls)}
    if "--help" in argv or "-h" in argv:
        print_help(cls)
        sys.exit(0)
    values, i = {}, 0
    while i < len(argv):
        name = argv[i].removeprefix("--")
        if not argv[i].startswith("--") or name not in types:
            raise ValueError(f"unknown option {argv[i]}; see --help")
        kind, raw = types[name], argv[i + 1] if i + 1 < len(argv) else None
        if kind is bool and (raw is None or raw.startswith("--")):
            values[name], i = True, i + 1
            continue
        if raw is None:
            raise ValueError(f"--{name} needs a value")
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--{name} takes true or false, not {raw!r}")
            values[name] = raw.lower() in ("true", "1")
        else:
            try:
                values[name] = kind(raw)
            except ValueError:
                raise ValueError(f"--{name} takes a{'n' if kind is int else ''} {kind.__name__}, "
                                 f"not {raw!r}") from None
        i += 2
    return cls(**values), set(values)


def print_help(cls):
    """The script's docstring, then each option with its default; the comment after each field
    in the source is its help, so the dataclass is the one place an option is documented."""
    source = "".join(inspect.getsource(c) for c in cls.__mro__ if is_dataclass(c))
    notes = dict(re.findall(r"^ +(\w+): .+?  # (.+)$", source, re.M))
    print(sys.modules[cls.__module__].__doc__.strip() + "\n\noptions (default):")
    for f in fields(cls):
        print(f"  --{f.name} {f.default!r}".ljust(32) + notes.get(f.name, ""))
