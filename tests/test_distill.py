"""Fine-tuning with distillation from the unpruned model, and the accuracy allowance."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import run_cli, run_main, torchrun
from hypothesis import given, settings
from hypothesis import strategies as st

from slim2deploy.base.errors import SlimError
from slim2deploy.model.checkpoint import load_checkpoint, save_checkpoint
from slim2deploy.model.loop import TrainConfig, distill_loss, step_loss

TRAIN = ["train", "--arch", "vgg11", "--width", "0.125", "--seed", "1", "--batch-size", "32"]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(2, 9), st.floats(0.5, 8.0), st.integers(0, 10_000))
def test_distillation_loss_is_zero_only_where_the_student_matches_the_teacher(n, classes, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, classes, generator=g) * 3
    assert float(distill_loss(teacher.clone(), teacher, temperature)) == pytest.approx(0.0, abs=1e-5)
    shifted = teacher + 5.0  # softmax does not see a constant shift of the logits
    assert float(distill_loss(shifted, teacher, temperature)) == pytest.approx(0.0, abs=1e-4)
    other = torch.randn(n, classes, generator=g) * 3
    if not torch.allclose(torch.softmax(other / temperature, 1), torch.softmax(teacher / temperature, 1), atol=1e-3):
        assert float(distill_loss(other, teacher, temperature)) > 0


def test_the_loss_mixes_cross_entropy_and_distillation_by_the_weight():
    out, taught, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    ce = torch.nn.functional.cross_entropy(out, y)
    kd = distill_loss(out, taught, 4.0)
    for w in (0.0, 0.3, 1.0):
        loss, terms = step_loss(out, y, taught, TrainConfig(distill_weight=w, distill_temperature=4.0))
        assert float(loss) == pytest.approx(float((1 - w) * ce + w * kd), rel=1e-6)
        assert set(terms) == {"ce", "kd"}
    assert set(step_loss(out, y, None, TrainConfig())[1]) == {"ce"}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, blobs_npz):
    """The unpruned model (2 epochs on the blobs) and its slim copy at ratio 0.5."""
    from slim2deploy.cli import main

    d = tmp_path_factory.mktemp("distill")
    full, slim = d / "full.pt", d / "slim.pt"
    assert main([*TRAIN, "--data", str(blobs_npz), "--epochs", "2", "--out", str(full)]) == 0
    assert main(["prune", "--model", str(full), "--ratio", "0.5", "--out", str(slim)]) == 0
    return full, slim


FT = ["--epochs", "2", "--batch-size", "32", "--device", "cpu", "--max-drop", "100"]


def test_a_distilled_fine_tune_records_its_teacher_and_shows_both_terms(pruned, blobs_npz, tmp_path):
    full, slim = pruned
    out = tmp_path / "ft.pt"
    proc = run_main("finetune", "--model", str(slim), "--teacher", str(full), "--data", str(blobs_npz), *FT,
                   "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"ce=\d", proc.stderr) and re.search(r"kd=\d", proc.stderr)  # progress shows both terms
    distill = load_checkpoint(out).meta["finetune"]["distill"]
    import hashlib

    assert distill["sha256"] == hashlib.sha256(full.read_bytes()).hexdigest()
    assert distill["weight"] == pytest.approx(0.7) and distill["temperature"] == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("teacher", "needle"),
    [
        ({"num_classes": 2, "input_shape": (1, 16, 16)}, "has 2 classes (the student's: 4)"),
        ({"num_classes": 4, "input_shape": (1, 28, 28)}, "has inputs (1, 28, 28) (the student's: (1, 16, 16))"),
    ],
    ids=["classes", "input"],
)
def test_a_teacher_of_other_classes_or_inputs_is_refused_in_one_line(
    pruned, blobs_npz, tmp_path, make_checkpoint, cli, teacher, needle
):
    _, slim = pruned
    other = make_checkpoint(**teacher)
    out = tmp_path / "ft.pt"
    status, _, err = cli("finetune", "--model", slim, "--teacher", other, "--data", blobs_npz, *FT, "--out", out)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert status == 2 and len(lines) == 1 and "the teacher" in lines[0] and needle in lines[0], err
    assert not out.exists()


def test_distillation_under_two_processes_equals_one_at_the_same_global_batch(pruned, blobs_npz, tmp_path, cli):
    full, slim = pruned
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    common = ["finetune", "--model", str(slim), "--teacher", str(full), "--data", str(blobs_npz), "--epochs", "1"]
    common += ["--device", "cpu", "--max-drop", "100"]
    status, _, err = cli(*common, "--batch-size", "32", "--out", one)
    assert status == 0, err
    proc = torchrun(*common, "--batch-size", "16", "--out", str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_checkpoint(one).state_dict, load_checkpoint(two).state_dict
    start = load_checkpoint(slim).state_dict
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4
    # and it did train: every conv and linear weight moved (running statistics alone would move without it)
    moved = {
        k: float((b[k].float() - start[k].float()).abs().max()) for k in b if k.endswith("weight") and b[k].dim() > 1
    }
    assert moved and min(moved.values()) > 1e-4, moved


def test_resuming_a_distilled_fine_tune_continues_exactly(pruned, blobs_npz, tmp_path, monkeypatch):
    """A 2-epoch distilled fine-tune interrupted right after its first epoch was saved, then resumed, ends
    with the weights of the same fine-tune run straight through."""
    from slim2deploy.pipeline import finetune as ft_mod
    from slim2deploy.pipeline import train as train_mod

    full, slim = pruned
    options = dict(data=str(blobs_npz), epochs=2, batch_size=32, device="cpu", max_drop=None, progress=False, log=None)
    whole, part = tmp_path / "whole.pt", tmp_path / "part.pt"
    ft_mod.finetune_checkpoint(slim, whole, distill=ft_mod.Distill(full), **options)
    real_save = train_mod.save_checkpoint

    def save_then_stop(ckpt, path):
        real_save(ckpt, path)
        raise KeyboardInterrupt  # as if the run were killed right after its first epoch was saved

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ft_mod.finetune_checkpoint(slim, part, distill=ft_mod.Distill(full), **options)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert load_checkpoint(part).meta["epochs"] == 1
    ft_mod.finetune_checkpoint(slim, part, distill=ft_mod.Distill(full), resume=part, **options)
    a, b = load_checkpoint(whole).state_dict, load_checkpoint(part).state_dict
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    with pytest.raises(SlimError, match="distill"):  # another loss would not continue that run
        ft_mod.finetune_checkpoint(slim, part, distill=ft_mod.Distill(full, weight=0.2), resume=part,
                                      **{**options, "epochs": 3})  # fmt: skip


def test_the_allowance_refuses_a_collapsed_model_in_a_real_build(blobs_npz, tmp_path, cli):
    """A model that was never sparse-trained, cut hard and not fine-tuned: exit 2 with one line, files kept."""
    model = tmp_path / "plain.pt"
    status, _, err = cli(*TRAIN, "--data", blobs_npz, "--epochs", "3", "--out", model)
    assert status == 0, err
    out = tmp_path / "b"
    proc = run_cli("build", "--model", str(model), "--ratio", "0.9", "--min-channels", "1", "--round-to", "1",
                   "--data", str(blobs_npz), "--finetune-epochs", "0", "--no-bench", "--out", str(out))  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "more than --max-drop 1 allows" in errors[0] and "--finetune-epochs" in errors[0]
    assert "warning: only" in proc.stdout + proc.stderr  # the gammas were never sparse: said before
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["within_allowance"] is False and (out / "slim.onnx").exists()


def test_build_warns_when_the_unpruned_model_does_no_better_than_the_most_common_class(pruned, blobs_npz, tmp_path):
    """Weights that do not fit the data (here: a classifier that always answers one class) make the allowance
    meaningless; build says so in its output and its report, and still runs (exit 0 within the allowance)."""
    full, _ = pruned
    ckpt = load_checkpoint(full)
    last = [k for k, v in ckpt.state_dict.items() if v.dim() == 2][-1]  # the classifier's weight
    ckpt.state_dict[last].zero_()
    bias = ckpt.state_dict[last.removesuffix("weight") + "bias"]
    bias.zero_()
    bias[1] = 1.0
    broken = tmp_path / "one-class.pt"
    save_checkpoint(ckpt, broken)
    out = tmp_path / "b"
    quick = ["--ratio", "0.3", "--data", blobs_npz, "--finetune-epochs", "0", "--max-drop", "100", "--no-bench",
             "--engine", "off"]  # fmt: skip
    proc = run_main("build", "--model", broken, *quick, "--out", out)
    assert proc.returncode == 0, proc.stderr
    warning = next(ln for ln in proc.stdout.splitlines() if "no better than always answering" in ln)
    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    assert acc["baseline"] <= acc["majority_class"] and f"({acc['majority_class']:.2%})" in warning
    assert "**Warning**: the unpruned model does no better" in (out / "report.md").read_text()
    proc = run_main("build", "--model", full, *quick, "--out", tmp_path / "ok")
    assert proc.returncode == 0 and "no better than always answering" not in proc.stdout  # it learnt: no warning


def test_no_chance_warning_when_the_held_out_images_are_of_one_class():
    """One class held out (a small `eval_limit`): always answering it scores 100%, so no score is 'no better'."""
    from slim2deploy.model.data import Dataset
    from slim2deploy.pipeline.build import warn_chance

    said: list[str] = []
    one = Dataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), ["a", "b"], (0.0,), (1.0,))
    warn_chance(1.0, one, said.append)
    two = Dataset(torch.zeros(4, 1, 8, 8), torch.tensor([0, 0, 0, 1]), ["a", "b"], (0.0,), (1.0,))
    warn_chance(0.75, two, said.append)
    assert len(said) == 1 and "(75.00%)" in said[0]


@pytest.mark.gpu
def test_a_distilled_fine_tune_runs_on_cuda_with_amp(pruned, blobs_npz, tmp_path):
    full, slim = pruned
    out = tmp_path / "ft.pt"
    args = ["--epochs", "1", "--batch-size", "32", "--device", "cuda", "--amp", "--max-drop", "100"]
    proc = run_main("finetune", "--model", str(slim), "--teacher", str(full), "--data", str(blobs_npz), *args,
                   "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(out).meta["finetune"]["distill"]["sha256"]
