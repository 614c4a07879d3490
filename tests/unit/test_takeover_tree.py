"""testbed.takeover.tree_difference: what the purge check counts as a leftover."""

from __future__ import annotations

from pathlib import Path

from testbed.takeover import tree_difference


def _tree(root: Path) -> Path:
    for rel, text in (("etc/kmodd.conf.d/keep", "x\n"), ("usr/lib/a.py", "a"),
                      ("var/lib/dpkg/status", "one"), ("var/log/x.log", "l")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "etc/link").symlink_to("/dev/null")
    return root


def test_identical_trees_have_no_difference(tmp_path: Path) -> None:
    assert tree_difference(_tree(tmp_path / "a"), _tree(tmp_path / "b")) == ()


def test_leftovers_are_reported(tmp_path: Path) -> None:
    before, after = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    (after / "usr/lib/kmodd").mkdir()                            # a directory left behind
    (after / "usr/lib/a.py").unlink()                            # a file removed
    (after / "etc/kmodd.conf.d/keep").write_text("changed\n")    # configuration edited
    (after / "etc/link").unlink()
    (after / "etc/link").symlink_to("/etc/other")                # a link retargeted
    diff = tree_difference(before, after)
    assert "- usr/lib/a.py" in diff
    assert "+ usr/lib/kmodd" in diff
    assert [d for d in diff if d.startswith("~ etc/kmodd.conf.d/keep")]
    assert [d for d in diff if d.startswith("~ etc/link (link /dev/null -> link /etc/other)")]
    assert len(diff) == 4, diff


def test_bookkeeping_and_logs_are_not_leftovers(tmp_path: Path) -> None:
    before, after = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    (after / "var/lib/dpkg/status").write_text("two")
    (after / "var/lib/dpkg/status-old").write_text("one")
    (after / "var/log/kmodd.log").write_text("new")
    (before / "usr/lib/a.py").chmod(0o644)
    (after / "usr/lib/a.py").chmod(0o600)                        # a mode outside /etc counts
    assert tree_difference(before, after) == ("~ usr/lib/a.py (file 100644 -> file 100600)",)
