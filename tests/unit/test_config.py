"""Parsing of /etc/subuid-style files and the uid range checks built on them."""

from __future__ import annotations

from pathlib import Path

from engine.config import (
    DEFAULT_UID_BASE,
    DEFAULT_UID_COUNT,
    free_uid_base,
    overlapping_ranges,
    read_subordinate_ranges,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_ranges_parsed(tmp_path: Path) -> None:
    subuid = write(tmp_path / "subuid", "alice:100000:65536\nbob:165536:65536\n")
    ranges = read_subordinate_ranges((subuid,))
    assert [(r.owner, r.start, r.count) for r in ranges] == [
        ("alice", 100000, 65536),
        ("bob", 165536, 65536),
    ]


def test_malformed_lines_skipped(tmp_path: Path) -> None:
    subuid = write(
        tmp_path / "subuid", "# comment\n\nbad\ncarol:x:1\ndave:5:\nerin:7:8\n"
    )
    ranges = read_subordinate_ranges((subuid,))
    assert [(r.owner, r.start, r.count) for r in ranges] == [("erin", 7, 8)]


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_subordinate_ranges((tmp_path / "absent",)) == []


def test_default_range_overlaps_first_user(tmp_path: Path) -> None:
    subuid = write(tmp_path / "subuid", "alice:100000:65536\n")
    ranges = read_subordinate_ranges((subuid,))
    overlaps = overlapping_ranges(DEFAULT_UID_BASE, DEFAULT_UID_COUNT, ranges)
    assert [r.owner for r in overlaps] == ["alice"]
    assert str(overlaps[0]) == f"{subuid}: alice:100000:65536"


def test_adjacent_ranges_do_not_overlap(tmp_path: Path) -> None:
    subgid = write(tmp_path / "subgid", "low:34464:65536\nhigh:165536:10\n")
    ranges = read_subordinate_ranges((subgid,))
    assert overlapping_ranges(DEFAULT_UID_BASE, DEFAULT_UID_COUNT, ranges) == []


def test_free_base_skips_every_range(tmp_path: Path) -> None:
    subuid = write(tmp_path / "subuid", "a:1048576:65536\nb:1114112:100000\n")
    ranges = read_subordinate_ranges((subuid,))
    base = free_uid_base(DEFAULT_UID_COUNT, ranges)
    assert base % 65536 == 0
    assert base >= 1114112 + 100000
    assert overlapping_ranges(base, DEFAULT_UID_COUNT, ranges) == []
