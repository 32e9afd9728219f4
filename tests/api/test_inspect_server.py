"""ktl.inspect.ServerView reads a running server's rounds through the SDK (the notebook's server mode)."""

from __future__ import annotations

from ktl import inspect as ki
from tests.api.conftest import federation, protos, register, wait_for


def test_server_view_lists_published_rounds_with_their_pairs_and_stats(http, admin) -> None:
    names = [f"n{c}" for c in range(10)]
    fed = federation(admin, quorum=1, class_names=names)
    (a,) = register(admin, http, fed["id"], 1)
    for r, classes in ((1, [0, 1]), (2, [1, 4])):
        a.upload(fed["id"], r, protos(classes, seed=r))
        wait_for(a, fed["id"], r, ("published",))
    view = ki.ServerView(a, fed["id"])
    assert view.class_names == names
    assert view.rounds() == [1, 2]  # round 3 is open, not published
    assert view.pairs(2).class_ids.tolist() == [1, 4]
    assert view.stats(1)["rows"] == 2
    tiles, labels = ki.class_images_over_rounds({r: view.pairs(r) for r in view.rounds()}, 10)
    assert tiles.shape == (20, 3, 32, 32) and labels[2] == "c1 r1"
