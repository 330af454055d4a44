import math
import re

import torch
from helpers import needs_fashion_mnist, run_cli, run_main, torchrun

from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.loop import CUDA_RESUME_ATOL
from slim2deploy.model.zoo import create_model

TRAIN = ["train", "--arch", "vgg11", "--width", "0.125", "--sparsity", "1e-3", "--seed", "3"]


def _weights(path):
    return load_checkpoint(path).state_dict


def test_resume_continues_exactly(tmp_path, blobs_npz, cli):
    # on CUDA --deterministic is what makes --seed repeatable, to the documented tolerance
    cuda = torch.cuda.is_available()
    data = ["--data", str(blobs_npz), "--batch-size", "32", *(["--deterministic"] if cuda else [])]
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    assert cli(*TRAIN, *data, "--epochs", "2", "--out", full)[0] == 0
    assert cli(*TRAIN, *data, "--epochs", "1", "--out", part)[0] == 0
    status, _, err = cli(*TRAIN, *data, "--epochs", "2", "--resume", part, "--out", part)
    assert status == 0, err
    a, b = _weights(full), _weights(part)
    atol = CUDA_RESUME_ATOL if cuda else 1e-6
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k
    assert load_checkpoint(part).meta["epochs"] == 2


def test_two_process_torchrun_equals_one_process_at_same_global_batch(tmp_path, blobs_npz, cli):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    common = [*TRAIN, "--data", str(blobs_npz), "--epochs", "1", "--device", "cpu"]
    status, _, err = cli(*common, "--batch-size", "32", "--out", one)
    assert status == 0, err
    proc = torchrun(*common, "--batch-size", "16", "--out", str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(one), _weights(two)
    assert load_checkpoint(two).meta["world_size"] == 2
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-4, worst
    # and it really trained: every conv and linear weight moved from what --seed initialises, and the loss of
    # the epoch is well under a guess's (ln 4 for the 4 blob classes; an untrained net stays at about 1.386)
    ckpt = load_checkpoint(two)
    torch.manual_seed(3)
    initial = create_model(ckpt.arch, **ckpt.arch_kwargs).state_dict()
    for k, w in b.items():
        if k.endswith("weight") and w.dim() > 1:
            assert float((w.float() - initial[k]).abs().max()) > 1e-3, k
    (epoch,) = ckpt.train_state["history"]
    assert epoch["train_loss"] < 0.9 * math.log(4) and epoch["train_acc"] > 0.3, epoch


@needs_fashion_mnist
def test_issue_command_shows_progress_and_inspect_reads_it(tmp_path):
    out = tmp_path / "x.pt"
    proc = run_cli(
        "train",
        "--arch",
        "vgg11",
        "--width",
        "0.25",
        "--data",
        "fashion-mnist",
        "--epochs",
        "1",
        "--limit-train",
        "5000",
        "--eval-limit",
        "1000",
        "--sparsity",
        "1e-4",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the progress bar; tqdm shows s/batch instead of batch/s when a batch takes over a second (loaded machine)
    assert "train 1/1" in proc.stderr and re.search(r"batch/s|s/batch", proc.stderr)
    assert "gamma<1e-2" in proc.stderr or "gamma<1e-2" in proc.stdout
    ckpt = load_checkpoint(out)
    assert ckpt.meta["val_acc"] > 0.5  # one short epoch on real data learns something
    plot = tmp_path / "g.png"
    insp = run_main("inspect", "--model", str(out), "--plot", str(plot))
    assert insp.returncode == 0, insp.stderr
    assert "features.1" in insp.stdout and "<1e-2" in insp.stdout and "MACs" in insp.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_data_says_how_to_get_it(tmp_path):
    proc = run_main("train", "--data", "fashion-mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x.pt"))
    assert proc.returncode != 0
    assert "apt-get install -y dataset-fashion-mnist" in proc.stderr
    assert not (tmp_path / "x.pt").exists()


def test_bad_flags_are_one_line_errors(tmp_path, blobs_npz):
    for extra, needle in ((["--epochs", "0"], "--epochs"), (["--arch", "nope"], "unknown model")):
        proc = run_main("train", "--data", str(blobs_npz), "--out", str(tmp_path / "x.pt"), *extra)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
