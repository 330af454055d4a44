"""base/cache.py: when a stage is skipped, what a damaged state file does, and the folder lock."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from helpers import hold_lock
from hypothesis import given, settings
from hypothesis import strategies as st

from slim2deploy.base.cache import NUMBER, StageCache, exclusive_dir, stage_key
from slim2deploy.base.errors import SlimError

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


def _run_once(cache: StageCache, stage: str, key: str, out: Path, text: str) -> bool:
    """Write ``text`` to ``out`` through the cache; True when the work ran."""

    def work() -> dict[str, int]:
        out.write_text(text)
        return {"chars": len(text)}

    return cache.run(stage, key, [out], work)[1]


def test_a_stage_is_skipped_only_with_the_same_key_and_intact_outputs(tmp_path: Path) -> None:
    state, out = tmp_path / "build.json", tmp_path / "a.txt"
    assert _run_once(StageCache(state), "a", "k1", out, "one")
    assert not _run_once(StageCache(state), "a", "k1", out, "one")  # a new process reads the record
    assert StageCache(state).info("a") == {"chars": 3}
    assert _run_once(StageCache(state), "a", "k2", out, "two")  # other inputs
    out.write_text("damaged")
    assert _run_once(StageCache(state), "a", "k2", out, "two")  # the output changed since
    out.unlink()
    assert _run_once(StageCache(state), "a", "k2", out, "two")  # the output is gone
    assert not _run_once(StageCache(state), "a", "k2", out, "two")


def test_keys_are_stable_and_tell_inputs_apart() -> None:
    assert stage_key("x", {"b": 1, "a": 2}) == stage_key("x", {"a": 2, "b": 1})
    assert stage_key("x", 1) != stage_key("x", 2) != stage_key("x", None)
    assert stage_key(Path("a")) == stage_key("a")


@pytest.mark.parametrize(
    "content",
    ["null", "[]", '"text"', "3", '{"a": null}', '{"a": []}', '{"a": {"key": 1, "outputs": {}}}',
     '{"a": {"key": "k", "outputs": []}}', '{"a": {"key": "k", "outputs": {"a.txt": 5}}}',
     '{"a": {"key": "k", "outputs": {}, "info": 7}}', "{not json", "\x00\xff"],
)  # fmt: skip
def test_a_state_file_of_the_wrong_shape_is_reset_with_a_message(tmp_path: Path, content: str) -> None:
    state, out = tmp_path / "build.json", tmp_path / "a.txt"
    state.write_text(content, errors="surrogateescape")
    messages: list[str] = []
    cache = StageCache(state, log=messages.append)
    assert len(messages) == 1 and str(state) in messages[0] and "again" in messages[0]
    assert _run_once(cache, "a", "k", out, "x")  # the malformed record never makes a stage look fresh
    assert not _run_once(StageCache(state, log=messages.append), "a", "k", out, "x")
    assert len(messages) == 1  # the rewritten file is well-formed


def test_well_formed_entries_survive_beside_malformed_ones(tmp_path: Path) -> None:
    state, out = tmp_path / "build.json", tmp_path / "a.txt"
    _run_once(StageCache(state), "a", "k", out, "x")
    data = json.loads(state.read_text())
    state.write_text(json.dumps({**data, "b": "garbage"}))
    messages: list[str] = []
    assert not _run_once(StageCache(state, log=messages.append), "a", "k", out, "x")
    assert "b" in messages[0]


INFO_SHAPE = {"chars": int, "parts": [{"ms": NUMBER}], "note": (type(None), str)}


@pytest.mark.parametrize(
    "info,ok",
    [
        ({"chars": 3, "parts": [], "note": None}, True),
        ({"chars": 3, "parts": [{"ms": 1.5}, {"ms": 2}], "note": "x", "other": [1]}, True),
        ({"chars": "3", "parts": [], "note": None}, False),  # a string where a number is
        ({"chars": True, "parts": [], "note": None}, False),  # JSON true is no count
        ({"parts": [], "note": None}, False),  # a missing key
        ({"chars": 3, "parts": [{"ms": "fast"}], "note": None}, False),  # deeper down
        ({"chars": 3, "parts": [{}], "note": None}, False),
        ({"chars": 3, "parts": {"ms": 1}, "note": None}, False),
        ({"chars": 3, "parts": [], "note": 5}, False),
    ],
)
def test_a_recorded_info_is_reused_only_in_the_shape_its_reader_needs(tmp_path: Path, info: dict, ok: bool) -> None:
    state, out = tmp_path / "build.json", tmp_path / "a.txt"
    out.write_text("x")
    StageCache(state).done("a", "k", [out], info)
    messages: list[str] = []
    assert StageCache(state, log=messages.append).fresh("a", "k", [out], INFO_SHAPE) == ok
    assert len(messages) == (0 if ok else 1)


@settings(max_examples=200, deadline=None)
@given(content=JSON)
def test_any_json_in_the_state_file_is_survivable(tmp_path_factory: pytest.TempPathFactory, content: object) -> None:
    folder = tmp_path_factory.mktemp("state")
    state, out = folder / "build.json", folder / "a.txt"
    state.write_text(json.dumps(content))
    cache = StageCache(state, log=lambda _: None)
    assert all(isinstance(e, dict) and isinstance(e["key"], str) for e in cache.data.values())
    out.write_text("x")
    fresh = cache.fresh("a", "k", [out])
    assert fresh == (isinstance(content, dict) and cache.data.get("a", {}).get("key") == "k"
                     and cache.data["a"]["outputs"].get("a.txt") is not None)  # fmt: skip


def test_the_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path: Path) -> None:
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(SlimError, match=rf"another build is writing to .* \(pid {holder.pid}\)"):
            with exclusive_dir(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel alone releases the lock
        holder.wait()
    with exclusive_dir(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    with exclusive_dir(tmp_path):  # released on leaving the block, too
        pass


def test_the_lock_file_is_removed_however_the_block_ends(tmp_path: Path) -> None:
    with exclusive_dir(tmp_path):
        assert (tmp_path / ".lock").is_file()
    assert not (tmp_path / ".lock").exists()
    with pytest.raises(SlimError, match="refused inside"):
        with exclusive_dir(tmp_path):
            raise SlimError("refused inside")
    assert list(tmp_path.iterdir()) == []


def test_the_lock_in_an_unwritable_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SlimError, match="cannot create"):
        with exclusive_dir(tmp_path / "missing" / "deeper"):
            pass
