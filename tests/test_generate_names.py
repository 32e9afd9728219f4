"""``ktl generate --image-folder`` names (issue 23, item 5): one folder per class, collision-free and
bounded in bytes, and a truncated PNG rewritten on resume."""

from __future__ import annotations

from pathlib import Path

import torch

from ktl.generate import MAX_FOLDER_BYTES, Source, _ImageNames, _png_ok, _write_pngs, class_folders


def source(names: list[str]) -> Source:
    n = len(names)
    return Source(torch.zeros(n, 4), torch.arange(n), names, "default", {})


def test_colliding_duplicate_and_long_class_names_get_distinct_bounded_folders() -> None:
    """Old code: ``a/b`` and ``a_b`` (or two classes named alike) shared one folder and overwrote each
    other's images (20 in the manifest, 10 on disk); 100 CJK characters failed with ENAMETOOLONG."""
    cjk = "猫" * 100  # 300 bytes in UTF-8
    folders = class_folders(source(["a/b", "a_b", "cat", "cat", "Cat", cjk, "", "..", cjk]))
    values = list(folders.values())
    assert len({v.casefold() for v in values}) == len(values) == 9  # distinct, case-insensitively too
    assert folders[0] == "a_b" and folders[1] == "a_b~1" and folders[2] == "cat" and folders[3] == "cat~3"
    assert all(0 < len(v.encode()) <= MAX_FOLDER_BYTES + 8 and "/" not in v for v in values)
    assert folders[5] == "猫" * (MAX_FOLDER_BYTES // 3)  # whole characters only
    assert class_folders(source(["a/b", "a_b"])) == {0: "a_b", 1: "a_b~1"}  # the same on every run


def test_every_image_gets_its_own_file_and_a_truncated_png_is_rewritten(tmp_path: Path) -> None:
    src = source(["a/b", "a_b"])
    names = _ImageNames(src, per_class=3)
    images = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    assert _write_pngs(tmp_path, names, 0, images, only_missing=True) == 6
    files = sorted(tmp_path.rglob("*.png"))
    assert len(files) == 6 and {f.parent.name for f in files} == {"a_b", "a_b~1"}
    victim = tmp_path / names(4)
    victim.write_bytes(victim.read_bytes()[:40])  # a run stopped mid-write
    assert not _png_ok(victim) and _png_ok(tmp_path / names(0))
    assert _write_pngs(tmp_path, names, 0, images, only_missing=True) == 1  # only the damaged one
    assert _png_ok(victim)
