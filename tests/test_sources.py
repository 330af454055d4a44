"""Model sources: weights files, library pretrained weights (from a cache the test fills), timm, import."""

import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize_batchnorm, run_cli

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import load_checkpoint
from slim2deploy.model.weights import read_state_dict
from slim2deploy.model.zoo import create_model
from slim2deploy.pipeline.import_model import import_model
from slim2deploy.prune.rebuild import model_from_checkpoint

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

OFFLINE = {"HF_HUB_OFFLINE": "1"}
TIMM_NAME = "test_resnet.r160_in1k"  # a tiny timm model with a pretrained tag


def _logits_match(ckpt_path: Path, reference: torch.nn.Module, shape: tuple[int, ...], seed: int = 0) -> None:
    model = model_from_checkpoint(load_checkpoint(ckpt_path))
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_weights_file_gives_the_library_models_logits(tmp_path, suffix):
    import torchvision

    ref = randomize_batchnorm(torchvision.models.resnet18(num_classes=10), 1, every_weight=True)
    weights = tmp_path / f"r18{suffix}"
    if suffix == ".pth":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, weights)
    else:
        safetensors_torch.save_file(ref.state_dict(), str(weights))
    out = tmp_path / "r18.pt"
    if suffix == ".pth":  # the real command once; the API for the other format
        proc = run_cli(
            "import",
            "--arch",
            "torchvision:resnet18",
            "--weights",
            str(weights),
            "--input-shape",
            "3,64,64",
            "--out",
            str(out),
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"{len(ref.state_dict())} tensors loaded" in proc.stdout and "missing" not in proc.stdout
    else:
        import_model("torchvision:resnet18", out, (3, 64, 64), weights=str(weights))
    ckpt = load_checkpoint(out)
    assert ckpt.num_classes == 10 and ckpt.input_shape == (3, 64, 64)  # the class count came from the file
    assert ckpt.meta["mean"] == pytest.approx([0.485, 0.456, 0.406])
    _logits_match(out, ref, (3, 64, 64))


def test_timm_weights_file_gives_the_library_models_logits(tmp_path):
    ref = randomize_batchnorm(timm.create_model(TIMM_NAME), 2, every_weight=True)
    weights = tmp_path / "t.safetensors"
    safetensors_torch.save_file(ref.state_dict(), str(weights))
    out, _ = import_model(f"timm:{TIMM_NAME}", tmp_path / "t.pt", (3, 96, 96), weights=str(weights))
    ckpt = load_checkpoint(out)
    assert ckpt.arch == f"timm:{TIMM_NAME}" and ckpt.num_classes == 1000
    assert tuple(ckpt.meta["mean"]) == pytest.approx(timm.get_pretrained_cfg(TIMM_NAME).mean)
    _logits_match(out, ref, (3, 96, 96))


def test_pretrained_uses_the_libraries_own_loaders_and_caches(tmp_path):
    import torchvision

    tv_ref = randomize_batchnorm(torchvision.models.mobilenet_v3_small(), 3, every_weight=True)
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(tv_ref.state_dict(), cache / url.rsplit("/", 1)[1])

    timm_ref = randomize_batchnorm(timm.create_model(TIMM_NAME), 4, every_weight=True)
    repo = tmp_path / "hf" / ("models--" + timm_ref.pretrained_cfg["hf_hub_id"].replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    safetensors_torch.save_file(timm_ref.state_dict(), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))

    env = {**OFFLINE, "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_CACHE": str(tmp_path / "hf")}
    for arch, ref, shape in (
        ("torchvision:mobilenet_v3_small", tv_ref, "3,64,64"),
        (f"timm:{TIMM_NAME}", timm_ref, "3,64,64"),
    ):
        out = tmp_path / f"{arch.split(':')[0]}.pt"
        proc = run_cli("import", "--arch", arch, "--pretrained", "--input-shape", shape, "--out", str(out), env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "pretrained weights" in proc.stdout
        _logits_match(out, ref, (3, 64, 64))


def test_num_classes_replaces_only_the_classifier(tmp_path):
    import torchvision

    ref = randomize_batchnorm(torchvision.models.resnet18(), 5, every_weight=True)
    weights = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), weights)
    out, report = import_model(
        "torchvision:resnet18", tmp_path / "r18-7.pt", (3, 32, 32), weights=str(weights), num_classes=7
    )
    assert report is not None and sorted(report.reinitialised) == ["fc.bias", "fc.weight"]
    assert "2 re-initialised for the new class count" in report.summary()
    state = load_checkpoint(out).state_dict
    assert state["fc.weight"].shape == (7, 512)
    assert not torch.allclose(state["fc.bias"], ref.state_dict()["fc.bias"][:7])
    for key, value in ref.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key


def test_missing_and_unexpected_keys_are_reported_and_a_foreign_file_is_refused(tmp_path):
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    state.pop("layer4.1.bn2.running_var")
    state["projection.weight"] = torch.zeros(3)
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    out, report = import_model("torchvision:resnet18", tmp_path / "o.pt", (3, 32, 32), weights=str(partial))
    assert report is not None
    assert "1 missing from the file (left as initialised): layer4.1.bn2.running_var" in report.summary()
    assert "1 unexpected in the file (ignored): projection.weight" in report.summary()
    assert load_checkpoint(out).meta["weights"]["unexpected"] == ["projection.weight"]

    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder.w": torch.zeros(2, 2)}, foreign)
    with pytest.raises(SlimError, match="none of the 1 tensors"):
        import_model("torchvision:resnet18", tmp_path / "f.pt", (3, 32, 32), weights=str(foreign))
    assert not (tmp_path / "f.pt").exists()


def test_a_pickled_module_is_only_read_with_trust_code(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(create_model("vgg11", width=0.125), path)
    with pytest.raises(SlimError, match="trust_code"):
        read_state_dict(path)
    with pytest.warns(UserWarning, match="unpickling"):
        assert "classifier.weight" in read_state_dict(path, trust_code=True)


def test_shape_clash_outside_the_classifier_names_the_tensor(tmp_path):
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(SlimError, match=r"conv1.weight .*check `arch`"):
        import_model("torchvision:resnet18", tmp_path / "o.pt", (3, 32, 32), weights=str(path))


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(SlimError, match=r"slim2deploy\[timm\]"):
        create_model("timm:resnet18")


def test_pretrained_without_a_cache_offline_says_what_to_do(tmp_path):
    env = {
        **OFFLINE,
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "TORCH_HOME": str(tmp_path / "t"),
        "no_proxy": "",
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    proc = run_cli(
        "import",
        "--arch",
        f"timm:{TIMM_NAME}",
        "--pretrained",
        "--input-shape",
        "3,64,64",
        "--out",
        str(tmp_path / "o.pt"),
        env=env,
    )
    assert proc.returncode == 2 and "as --weights" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.pt").exists()
