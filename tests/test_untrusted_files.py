"""No file the project reads can run code: a training checkpoint with a pickle planted in each place
a loader reads (DCP's .metadata, an optimizer entry DCP stores as pickled bytes, the RNG file, a
converted model.pth) is refused in one line by every entry point, and the planted code never runs."""

import os
import pickle
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from test_checkpoint import init_dir, run, train_args  # noqa: F401  (init_dir: a fixture)


class Planted:
    """Unpickling this runs `touch MARKER` (pickle calls what __reduce__ names)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def trained(init_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("trained") / "run"
    run(train_args(init_dir, out, "--stop_after", "10", "--weights", "fp32"))  # epoch-01
    return out


def plant_metadata(ckpt, part, marker):
    (ckpt / part / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    return ckpt / part / ".metadata"


def plant_optimizer_entry(ckpt, marker):
    """Replace one non-tensor entry of the optimizer's DCP state (a hyperparameter) by the plant."""
    whole = ckpt.parent / "optim.pt"
    dcp_to_torch_save(ckpt / "optim", whole)  # our own file: trusted, read by DCP's own loader
    state = torch.load(whole, weights_only=False)
    state["param_groups"][0]["lr"] = Planted(marker)
    shutil.rmtree(ckpt / "optim")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process, on purpose
        dcp.save(state, checkpoint_id=ckpt / "optim", no_dist=True)  # pickles the plant, runs nothing
    assert not marker.exists()
    return ckpt / "optim"


def plant_rng(ckpt, marker):
    torch.save({"cpu": Planted(marker)}, ckpt / "rng-0.pt")
    return ckpt / "rng-0.pt"


def copy_run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out, out / "epoch-01"


def assert_refused(result, names, marker):
    assert result.returncode in (1, 2), result.stdout[-2000:] + result.stderr[-2000:]  # eval.py: 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(names) in last and "refused" in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not marker.exists(), "the planted code ran"


@pytest.mark.parametrize("place", ["model metadata", "optimizer metadata", "optimizer entry", "rng file"])
def test_resume_refuses_a_checkpoint_with_planted_code(init_dir, trained, tmp_path, place):  # noqa: F811
    out, ckpt = copy_run(trained, tmp_path)
    marker = tmp_path / "ran"
    names = {"model metadata": lambda: plant_metadata(ckpt, "model", marker),
             "optimizer metadata": lambda: plant_metadata(ckpt, "optim", marker),
             "optimizer entry": lambda: plant_optimizer_entry(ckpt, marker),
             "rng file": lambda: plant_rng(ckpt, marker)}[place]()
    result = run(train_args(init_dir, out, "--weights", "fp32", "--resume", "auto"), check=False)
    assert_refused(result, names, marker)


@pytest.mark.parametrize("entry", ["sample", "export", "eval loss"])
def test_every_reader_of_a_checkpoint_refuses_planted_metadata(trained, tmp_path, entry):
    _, ckpt = copy_run(trained, tmp_path)
    marker = tmp_path / "ran"
    names = plant_metadata(ckpt, "model", marker)
    command = {"sample": ["sample.py", "--checkpoint", str(ckpt), "--prompt", "Hi", "--max_len", "40"],
               "export": ["checkpoint.py", "export", str(ckpt), str(tmp_path / "exported")],
               "eval loss": ["eval.py", "loss", "--run", str(ckpt.parent), "--dev", "data/demo/dev.jsonl"]}[entry]
    assert_refused(run(command, check=False), names, marker)


def test_a_converted_model_file_with_planted_code_is_refused(init_dir, tmp_path):  # noqa: F811
    planted = tmp_path / "init"
    shutil.copytree(init_dir, planted)
    marker = tmp_path / "ran"
    torch.save({"tok_embeddings.weight": Planted(marker)}, planted / "model.pth")
    for command in (train_args(planted, tmp_path / "out"), ["sample.py", "--checkpoint", str(planted), "--prompt", "Hi"]):
        assert_refused(run(command, check=False), planted / "model.pth", marker)


def test_the_plants_really_run_code_through_dcps_own_loader(trained, tmp_path):
    """The check of the tests above: without this project's loaders each plant does run."""
    _, ckpt = copy_run(trained, tmp_path)
    model_marker, optim_marker = tmp_path / "ran-model", tmp_path / "ran-optim"
    plant_metadata(ckpt, "model", model_marker)
    plant_optimizer_entry(ckpt, optim_marker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointException):  # it runs the plant, then finds no metadata in what it returned
            dcp_to_torch_save(ckpt / "model", tmp_path / "model.pt")
        dcp_to_torch_save(ckpt / "optim", tmp_path / "optim.pt")
    assert model_marker.exists() and optim_marker.exists()
