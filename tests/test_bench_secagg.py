"""`ktl bench secagg` on the smoke preset: the four methods run on Flower with no failure; SecAgg+ costs
four exchanges per round and more bytes each way than the plain method, and the table says so."""

import json

import pytest

from ktl.cli import main


@pytest.mark.slow  # make test-all (make test keeps SecAgg+ on Flower in test_secure_aggregation)
def test_the_secagg_benchmark_measures_plain_and_secure_rounds_side_by_side(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert (
        main(["-q", "bench", "secagg", "--preset", "smoke", "--clients", "3", "--rounds", "2", "--json"]) == 0
    )
    res = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"fedproto", "fedproto-secagg", "fedktl", "fedktl-secagg"}
    assert all(
        r["failures"] == 0 and 0 <= r["final_accuracy"] <= 1 and r["round_s"] > 0 for r in rows.values()
    )
    for plain in ("fedproto", "fedktl"):
        secure = rows[f"{plain}-secagg"]
        # Keys, encrypted shares and masked vectors cost more than one plain reply of fp16 prototypes.
        assert secure["received_per_client"] > rows[plain]["received_per_client"] > 0
        assert secure["sent_per_client"] > 0
