"""The command line of every script, with the standard library only: no torch is imported here, so
a script that parses its command line before importing torch answers --help and a mistyped option at
once (importing torch takes a second or more).

train.py and sample.py: one --name value (or --name=value) per field of a config dataclass.
    python train.py --help     # every option, its default, its choices or range, and the comment beside its field

A field declares what it accepts in its annotation, and parse_config checks it in one place:
    dtype: Literal["auto", "bf16", "fp32"] = "auto"           # one of these
    epochs: Annotated[int, Range(ge=1)] = 15                   # at least 1
    resid_dropout: Annotated[float, Range(ge=0, lt=1, also=(-1,))] = -1.0   # -1 or in [0, 1)

eval.py, checkpoint.py, convert.py and data.py take subcommands or positional arguments: argparse,
through Parser, which prints an error as one line and each option's default and choices in --help.

Every script reads its command line in a first block that needs only this module, and imports
torch after it, so that --help and a wrong option are answered (and exit) there:
    if __name__ == "__main__":
        parse_or_exit(TrainConfig, sys.argv[1:])
    import torch
"""

import argparse
import difflib
import inspect
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, fields, is_dataclass


def num(value) -> str:
    """A bound as a person writes it: 4294967296, not 4.29497e+09; 0.9, not 0.900000."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Range:
    """The numbers a numeric field accepts: within the bounds given (ge >=, gt >, le <=, lt <),
    or one of `also` (a special value, such as -1 for "auto"). Always a finite number."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple = ()

    def allows(self, value) -> bool:
        if value in self.also:
            return True
        return (math.isfinite(value) and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        low, high = (self.ge, "[") if self.ge is not None else (self.gt, "(")
        top, end = (self.le, "]") if self.le is not None else (self.lt, ")")
        if low is not None and top is not None:
            text = f"in {high}{num(low)}, {num(top)}{end}"
        elif low is not None:
            text = f"at least {num(low)}" if self.ge is not None else f"greater than {num(low)}"
        elif top is not None:
            text = f"at most {num(top)}" if self.le is not None else f"less than {num(top)}"
        else:
            text = "a finite number"
        return " or ".join([num(v) for v in self.also] + [text])


def field_spec(f) -> tuple[type, tuple | None, Range | None]:
    """A dataclass field's (type, choices or None, Range or None), from its annotation."""
    kind, allowed = f.type, None
    extras = ()
    if typing.get_origin(kind) is typing.Annotated:
        kind, *extras = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Literal:
        allowed = typing.get_args(kind)
        kind = type(allowed[0])
    return kind, allowed, next((e for e in extras if isinstance(e, Range)), None)


def check_fields(config):
    """Raise ValueError naming the first field whose value is not among its choices or in its range."""
    for f in fields(config):
        _, allowed, bounds = field_spec(f)
        value = getattr(config, f.name)
        if allowed is not None and value not in allowed:
            raise ValueError(f"--{f.name} must be one of {', '.join(map(str, allowed))}, not {value!r}")
        if bounds is not None and not bounds.allows(value):
            raise ValueError(f"--{f.name} must be {bounds}, not {value!r}")


def check_device(name: str) -> str:
    """A --device value torch can name: auto (cuda if there is one, else cpu), cpu, cuda or cuda:N."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}")
    return name


def huge_pages_for_tensors():
    """Have torch back each CPU tensor of 2 MB or more with 2 MB pages (Linux's transparent huge
    pages, through torch's THP_MEM_ALLOC_ENABLE). A decode step reads every weight once; with
    4 KB pages that is a page-table walk every 4 KB. Measured on 2 cores of a Xeon: a 100m
    model's compiled batch-1 step 19.1 ms against 20.2. torch reads the variable at its first
    allocation, so call this before importing torch; a THP_MEM_ALLOC_ENABLE already set wins.
    For decoding only: training allocates many activations of a few MB, which would round up."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def parse_config(cls, argv: list[str]):
    """argv -> (cls(**given values), set of given names). A bool may stand alone (--chat).

    Every value is checked against its field's type, choices and range (check_fields), and an
    option that is not a field is refused. An option given again overrides the earlier value (as
    argparse does): scripts and tests append overrides to a command line.
    """
    kinds = {f.name: field_spec(f)[0] for f in fields(cls)}
    if "--help" in argv or "-h" in argv:
        print_help(cls)
        sys.exit(0)
    values, i = {}, 0
    while i < len(argv):
        name, inline, given = argv[i].removeprefix("--").partition("=")
        if not argv[i].startswith("--") or name not in kinds:
            close = difflib.get_close_matches(name, kinds, n=1)
            hint = f" (did you mean --{close[0]}?)" if close and argv[i].startswith("--") else ""
            raise ValueError(f"unknown option {argv[i]}{hint}; see --help")
        kind = kinds[name]
        if inline:  # --name=value
            raw, step = given, 1
        else:
            raw, step = (argv[i + 1] if i + 1 < len(argv) else None), 2
            if raw is not None and raw.startswith("--") and (kind is bool or raw[2:].partition("=")[0] in kinds):
                raw = None  # the next option, not a value
            if kind is bool and raw is None:
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
            if kind is float and not math.isfinite(values[name]):
                raise ValueError(f"--{name} takes a finite number, not {raw!r}")
        i += step
    config = cls(**values)
    check_fields(config)
    return config, set(values)


def parse_or_exit(cls, argv: list[str]):
    """parse_config, with a wrong option as one `error:` line and exit status 1 (--help: exit 0)."""
    try:
        return parse_config(cls, argv)
    except ValueError as e:
        sys.exit(f"error: {e}")


def print_help(cls):
    """The script's docstring, then each option with its default, its choices or range; the
    comment after each field in the source is its help, so the dataclass is the one place an
    option is documented."""
    source = "".join(inspect.getsource(c) for c in cls.__mro__ if is_dataclass(c))
    notes = dict(re.findall(r"^ +(\w+): .+?  # (.+)$", source, re.M))
    print(sys.modules[cls.__module__].__doc__.strip() + "\n\noptions (default):")
    for f in fields(cls):
        _, allowed, bounds = field_spec(f)
        accepts = (f"one of {', '.join(map(str, allowed))}" if allowed is not None
                   else str(bounds) if bounds is not None else "")
        note = "; ".join(part for part in (notes.get(f.name, ""), accepts) if part)
        print(f"  --{f.name} {f.default!r}".ljust(31), note)


# ---- argparse, for the scripts with subcommands or positional arguments ----

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (a script's docstring of commands), and each option's default at
    the end of its help line, unless it has none to show (a required option, a flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if not (nothing or action.required or "default" in text):
            text += f" (default: {action.default})"
        return text


class Parser(argparse.ArgumentParser):
    """argparse, with errors as one `error:` line (exit status `status`), --help formatted by
    HelpFormatter, and no abbreviated options (--max_l would silently mean --max_len, and quietly
    change meaning when another option starts alike)."""

    def __init__(self, *args, status: int = 2, **kwargs):
        super().__init__(*args, allow_abbrev=False, formatter_class=HelpFormatter, **kwargs)
        self.status = status

    def error(self, message):
        fail(message, self.status)


def fail(message, status: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def at_least(low, kind=int, inclusive=None):
    """An argparse type: a number of this kind, at least low (for a float, unless inclusive:
    greater than low)."""
    inclusive = kind is int if inclusive is None else inclusive

    def number(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"not {text!r}") from None
        if not (math.isfinite(value) and (value >= low if inclusive else value > low)):
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'greater than'} "
                                             f"{low}, not {text!r}")
        return value
    return number


def device_name(text: str) -> str:
    """An argparse type: check_device's."""
    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--device ")) from None
