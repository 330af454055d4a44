"""Calibration sets: stratified sampling, the committed Fashion-MNIST set, and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ROOT, needs_fashion_mnist, run_main
from hypothesis import given, settings
from hypothesis import strategies as st

from slim2deploy.base.errors import SlimError
from slim2deploy.deploy.calib import check_calib, load_calib, make_calib_set, stratified_indices


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 11), min_size=50, max_size=400), st.data(), st.integers(0, 999))
def test_stratified_indices_are_unique_sized_and_proportional(labels, data, seed):
    y = np.array(labels)
    n = data.draw(st.integers(1, len(y) - 1), label="n")
    idx = stratified_indices(y, n, seed=seed)
    assert len(idx) == n and len(np.unique(idx)) == n
    for c in np.unique(y):
        share = (y == c).mean() * n
        assert abs((y[idx] == c).sum() - share) <= 1.0


def test_committed_fashion_mnist_set_is_valid_and_balanced():
    path = ROOT / "calib" / "fashion-mnist-512.npz"
    x = load_calib(path, (1, 28, 28))
    assert x.shape == (512, 1, 28, 28) and x.dtype == np.float32
    y = np.load(path)["y"]
    assert np.bincount(y, minlength=10).min() >= 51
    # normalised with mean 0.2860, std 0.3530: black pixels map to -0.810, white to 2.023
    assert x.min() == pytest.approx(-0.2860 / 0.3530, abs=1e-3)
    assert x.max() == pytest.approx((1 - 0.2860) / 0.3530, abs=1e-3)


@needs_fashion_mnist
def test_make_calib_set_is_seeded_and_stratified(tmp_path):
    a = make_calib_set("fashion-mnist", 100, tmp_path / "a.npz", seed=0)
    b = make_calib_set("fashion-mnist", 100, tmp_path / "b.npz", seed=0)
    c = make_calib_set("fashion-mnist", 100, tmp_path / "c.npz", seed=1)
    xa, xb, xc = (np.load(p)["x"] for p in (a, b, c))
    assert np.array_equal(xa, xb) and not np.array_equal(xa, xc)
    assert np.bincount(np.load(a)["y"], minlength=10).tolist() == [10] * 10
    assert load_calib(a, (1, 28, 28)).shape == (100, 1, 28, 28)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("wrong_shape", "the model takes"),
        ("float64", "dtype float64"),
        ("nan", "NaN"),
        ("raw_pixels", "raw pixels"),
        ("no_x", "no array 'x'"),
        ("three_dims", "N x C x H x W"),
        ("truncated", "not a readable"),
        ("missing", "no such calibration set"),
    ],
)
def test_bad_calibration_sets_give_one_clear_error(tmp_path, case, expected):
    good = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    path = tmp_path / f"{case}.npz"
    if case == "wrong_shape":
        _write(path, x=np.zeros((4, 3, 32, 32), np.float32))
    elif case == "float64":
        _write(path, x=good.astype(np.float64))
    elif case == "nan":
        good[0, 0, 0, 0] = np.nan
        _write(path, x=good)
    elif case == "raw_pixels":
        _write(path, x=np.full((4, 1, 28, 28), 255.0, np.float32))
    elif case == "no_x":
        _write(path, images=good)
    elif case == "three_dims":
        _write(path, x=good[:, 0])
    elif case == "truncated":
        _write(path, x=good)
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(SlimError, match=expected):
        load_calib(path, (1, 28, 28))


def test_check_calib_accepts_good_inputs_unchanged():
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    assert check_calib(x, (3, 8, 8)) is x


@needs_fashion_mnist
def test_calib_command_writes_a_set_and_rejects_bad_n(tmp_path):
    out = tmp_path / "cal.npz"
    res = run_main("calib", "--data", "fashion-mnist", "--n", "20", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert load_calib(out, (1, 28, 28)).shape == (20, 1, 28, 28)
    bad = run_main("calib", "--n", "0", "--out", str(tmp_path / "bad.npz"))
    assert bad.returncode == 2 and "--n: must be at least 1" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad.npz").exists()
