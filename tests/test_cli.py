"""The command line of every script: --help and a usage error answer before torch is imported, every
option's help line says what it means, its default and its choices, and the names the options take
are the ones the code knows (one dtype map, the presets, the weights modes)."""

import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

import checkpoint
import cli
import convert
import data
import eval as ev
import memory
import sample
import train
from model import CONFIGS, DTYPES

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train.py", "sample.py", "eval.py", "checkpoint.py", "convert.py", "data.py"]


def run(argv: list[str]) -> tuple[subprocess.CompletedProcess, set[str], float]:
    """`python argv...`: its result, the modules it imported (from -X importtime) and its seconds."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=ROOT, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    seconds = time.perf_counter() - start
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return result, modules, seconds


USAGE_ERRORS = [["train.py", "--epoch", "3"], ["train.py", "--dtype", "fp16"], ["sample.py", "--prompt", "hi"],
                ["sample.py", "--checkpoint", "c", "--prompt", "hi", "--chat"], ["eval.py", "loss", "--run", "r"],
                ["eval.py", "answers", "--run", "r", "--dev", "d", "--epochs", "9-1"], ["checkpoint.py"],
                ["checkpoint.py", "export", "a", "b", "--dtype", "fp8"], ["convert.py", "--to-hf", "a", "b"],
                ["data.py", "--world_size", "x"]]


@pytest.mark.parametrize("argv", [[s, "--help"] for s in SCRIPTS] + USAGE_ERRORS, ids=" ".join)
def test_help_and_usage_errors_answer_before_torch_is_imported(argv):
    result, modules, seconds = run(argv)
    if "--help" in argv:
        assert result.returncode == 0 and "--" in result.stdout, result.stderr[-2000:]
    else:
        lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "torch" not in modules and "numpy" not in modules and "sentencepiece" not in modules
    assert seconds < 5  # about 0.1 s; the bound only catches torch's import (1-10 s) coming back


def test_the_check_can_see_torch():
    """The test above would pass vacuously if importtime never named torch: a real run imports it."""
    assert "torch" in run(["sample.py", "--checkpoint", "nowhere", "--prompt", "hi"])[1]


def argparse_options(parser) -> list:
    """Every option of an argparse parser and of its subcommands, but -h."""
    actions = []
    for action in parser._actions:
        if action.choices and isinstance(action.choices, dict):  # the subcommands
            for sub in action.choices.values():
                actions += argparse_options(sub)
        elif action.dest != "help":
            actions.append((parser.prog, action))
    return actions


@pytest.mark.parametrize("script", [ev, checkpoint, convert, data], ids=lambda m: m.__name__)
def test_every_argparse_option_says_what_it_is_and_its_default(script):
    for prog, action in argparse_options(script.build_parser()):
        assert action.help, f"{prog} {action.option_strings or action.dest}: no help"
        text = cli.HelpFormatter(prog)._get_help_string(action)
        has_default = not (action.default is None or action.default is False or action.default == [] or action.required)
        assert ("default" in text) == has_default or "default" in action.help, (prog, action.dest, text)


@pytest.mark.parametrize("config", [train.TrainConfig, sample.Config], ids=lambda c: c.__name__)
def test_every_dataclass_option_has_a_help_line_with_its_default_and_choices(config, capsys):
    with pytest.raises(SystemExit) as done:
        cli.parse_config(config, ["--help"])
    assert done.value.code == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  --")}
    assert list(lines) == [f"--{f.name}" for f in fields(config)]
    for f in fields(config):
        name, default, *meaning = lines[f"--{f.name}"].split(maxsplit=2) + [""]
        assert default == repr(f.default) and meaning[0].strip(), lines[f"--{f.name}"]
        _, allowed, bounds = cli.field_spec(f)
        if allowed is not None:
            assert lines[f"--{f.name}"].endswith(f"one of {', '.join(allowed)}")
        if bounds is not None:
            assert lines[f"--{f.name}"].endswith(str(bounds))


def test_the_names_options_take_are_the_ones_the_code_knows():
    def choices(config, name):
        return cli.field_spec(next(f for f in fields(config) if f.name == name))[1]
    assert choices(train.TrainConfig, "preset") == tuple(CONFIGS)  # train.PRESETS, spelled out without torch
    assert choices(train.TrainConfig, "weights") == ("auto", *memory.WEIGHTS)
    dtypes = [choices(c, "dtype") for c in (train.TrainConfig, sample.Config)]
    dtypes += [a.choices for _, a in argparse_options(ev.build_parser()) + argparse_options(checkpoint.build_parser())
               + argparse_options(convert.build_parser()) if a.dest == "dtype"]
    assert len(dtypes) == 6
    for choices in dtypes:
        assert set(choices) - {"auto"} <= set(DTYPES), choices


def test_the_command_line_module_imports_no_torch():
    code = "import sys, cli; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
