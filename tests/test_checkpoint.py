import os
import pickle

import pytest
import torch
from helpers import run_cli, run_main

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import (
    Checkpoint,
    checkpoint_for,
    load_checkpoint,
    save_checkpoint,
)
from slim2deploy.model.zoo import create_model
from slim2deploy.prune.rebuild import model_from_checkpoint

META = {"mean": [0.0], "std": [1.0]}


def test_round_trip_is_weights_only_and_exact(tmp_path):
    kwargs = {"in_channels": 1, "num_classes": 10, "width": 0.25}
    model = create_model("resnet20", **kwargs)
    path = save_checkpoint(checkpoint_for(model, "resnet20", kwargs, (1, 28, 28), 10, meta=META), tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)  # the format itself needs no pickled classes
    assert raw["format"].startswith("slim2deploy.checkpoint/")
    rebuilt = model_from_checkpoint(load_checkpoint(path))
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), rebuilt(x))
    assert "torch" in raw["meta"]["versions"]


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch, make_checkpoint):
    path = make_checkpoint("resnet20", width=0.25, meta=META, path=tmp_path / "m.pt")
    before = path.read_bytes()
    bad = Checkpoint("vgg11", {}, (1, 28, 28), 10, {"w": torch.zeros(1)})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(SlimError, match="disk full"):
        save_checkpoint(bad, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


@pytest.mark.parametrize("case", ["missing", "truncated", "text", "state_dict", "directory"])
def test_bad_checkpoint_gives_one_clear_error_and_nonzero_exit(tmp_path, case, make_checkpoint):
    good = make_checkpoint("resnet20", width=0.25, meta=META)
    target = tmp_path / "bad.pt"
    if case == "truncated":
        target.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "text":
        target.write_text("this is not a checkpoint\n")
    elif case == "state_dict":
        torch.save(create_model("vgg11", width=0.125).state_dict(), target)
    elif case == "directory":
        target.mkdir()
    proc = run_main("inspect", "--model", str(target))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr
    expected = {
        "missing": "no such checkpoint",
        "truncated": "truncated",
        "text": "not",
        "state_dict": "bare state_dict",
        "directory": "directory",
    }[case]
    assert expected in lines[0]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_not_executed_without_trust(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "slim2deploy.checkpoint/1", "state_dict": {}, "x": _Payload(marker)}, evil)
    with pytest.raises(SlimError, match="trust_code"):
        load_checkpoint(evil)
    proc = run_cli("inspect", "--model", str(evil))
    assert proc.returncode != 0 and "--trust-code" in proc.stderr
    assert not marker.exists()


def test_pickled_module_loads_only_with_trust(tmp_path):
    model = create_model("vgg11", in_channels=1, num_classes=10, width=0.125).eval()
    path = tmp_path / "module.pt"
    torch.save(model, path)
    with pytest.raises(SlimError, match="pickled"):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match="runs any code"):
        ckpt = load_checkpoint(path, trust_code=True)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model_from_checkpoint(ckpt)(x), model(x))


def test_user_factory_needs_trust(tmp_path):
    kwargs = {"in_channels": 1, "num_classes": 10, "width": 0.125}
    model = create_model("vgg11", **kwargs)
    ckpt = checkpoint_for(model, "slim2deploy.model.nets:VGG", {}, (1, 28, 28), 10)
    with pytest.raises(SlimError, match="trust"):
        model_from_checkpoint(ckpt)


def test_pickle_module_used_by_payload_is_really_blocked():
    # guards the test above: the payload would run if unpickled without weights_only
    assert pickle.loads(pickle.dumps(_Payload("/dev/null"))) == 0
