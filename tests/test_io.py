"""gaq_calc.io: atomic writes leave the old file or the new one, never half of one, and no temporary file."""

import errno
import json

import pytest

from gaq_calc.io import atomic_path, write_json_atomic, write_text_atomic


def test_write_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "card.json"
    write_text_atomic(target, "old\n")
    write_json_atomic(target, {"e": 1.5, "nan": float("nan")})
    assert json.loads(target.read_text())["e"] == 1.5
    assert [p.name for p in target.parent.iterdir()] == ["card.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "log.csv"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["log.csv"]


def test_an_os_error_names_the_file(tmp_path):
    target = tmp_path / "checkpoint.json"
    with pytest.raises(OSError, match="checkpoint.json") as info, atomic_path(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC and not target.exists()


def test_suffix_keeps_the_extension_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "curves.png", suffix=".tmp.png") as tmp:
        assert tmp.name.endswith(".tmp.png") and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert (tmp_path / "curves.png").read_bytes() == b"png"
