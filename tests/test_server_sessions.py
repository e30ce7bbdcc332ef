"""Session-window features over HTTP equal the Python client's, from a real pipeline run into
Redis: every session function (current and last session), beside a tile window and derived
features reading them, for live, idle, expired and unknown entities, in JSON and Arrow, for
bare-view, named and single-entity requests."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pytest

from tests.conftest import Services
from tests.server_mixed_helpers import (
    ARROW,
    USERS,
    World,
    assert_arrow_equals_client,
    assert_json_equals_client,
    online,
    same_minute,
    session_events,
    world,
)


@pytest.fixture(scope="module")
def sessions(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with world(services, tmp_path_factory.mktemp("sess"), "session_view", session_events) as w:
        yield w


def test_bare_view_json_equals_the_client_with_statuses(sessions: World) -> None:
    cols = assert_json_equals_client(sessions, USERS)
    # Independent of the client: u1's current session is (-6, -2, -2) min, the last closed one
    # (-32, -25, -21); u4's only session ended 40 minutes ago.
    assert cols["events_count_session_10m"]["values"] == [3, 0, 0, 0, 2]
    assert cols["events_count_last_session_10m"]["values"][0] == 3
    assert cols["events_count_last_session_10m"]["values"][3] == 2
    assert cols["amount_sum_last_session_10m"]["values"][0] == 4.25
    assert cols["amount_sum_session_10m"]["values"][0] == 10.5
    assert cols["session_duration_10m"]["values"] == [240.0, None, None, None, 300.0]  # seconds
    assert cols["last_session_duration_10m"]["values"][0] == 660.0
    assert cols["last_session_duration_10m"]["values"][3] == 420.0
    assert cols["cur_avg"]["values"][0] == 3.5  # 10.5 / 3
    for name, col in cols.items():
        if name == "user_id":
            continue
        assert col["statuses"][1] == "OUTSIDE_MAX_AGE", name
        assert col["statuses"][2] == "NOT_FOUND", name
    assert cols["events_count_session_10m"]["statuses"] == [
        "PRESENT",
        "OUTSIDE_MAX_AGE",
        "NOT_FOUND",
        "PRESENT",  # live (40 minutes idle, within the TTL): a count of 0 is a value
        "PRESENT",
    ]
    assert cols["amount_mean_session_10m"]["statuses"][3] == "NULL_VALUE"  # no current session
    assert cols["cur_avg"]["statuses"][3] == "NULL_VALUE"  # 0 / 0
    assert cols["amount_mean_last_session_10m"]["statuses"][3] == "PRESENT"


def test_arrow_equals_the_client(sessions: World) -> None:
    table = assert_arrow_equals_client(sessions, USERS)
    assert table.schema.field("events_count_session_10m").type == pa.int64()
    assert table.schema.field("amount_mean_session_10m").type == pa.float64()
    assert table.column("cur_avg__status").to_pylist()[:3] == ["PRESENT", "OUTSIDE_MAX_AGE", "NOT_FOUND"]


def test_named_features_and_derived_alone(sessions: World) -> None:
    wanted = ["visits:cur_share", "visits:amount_last_last_session_10m", "visits:hour_count"]
    resp, expected = online(sessions, wanted, ["u4", "u1", "nobody", "u1"])
    results = resp.json()["results"]
    assert resp.json()["metadata"]["feature_names"] == [
        "user_id",
        "cur_share",
        "amount_last_last_session_10m",
        "hour_count",
    ]
    for ref, col in zip(wanted, results[1:], strict=True):
        assert col["values"] == expected.values[ref], ref
    assert results[2]["values"][1] == -2.0 and results[3]["values"][1] == 6
    assert results[1]["statuses"][2] == "NOT_FOUND"


def test_vector_equals_the_client(sessions: World) -> None:
    for user in ("u1", "u4", "u3"):
        resp, at = same_minute(lambda u=user: sessions.server.get(f"/features/visits/{u}"))
        assert resp.status_code == 200, resp.text
        expected = sessions.store.get_online_features(["visits"], [user], as_of=at)
        vec = resp.json()
        assert vec["features"] == {k.split(":")[1]: v[0] for k, v in expected.values.items()}
    some = sessions.server.get("/features/visits/u1?features=cur_avg,events_count_session_10m").json()
    assert some["features"] == {"cur_avg": 3.5, "events_count_session_10m": 3}
    arrow = sessions.server.get("/features/visits/u1", headers=ARROW)
    assert arrow.status_code == 200, arrow.text
    assert pa.ipc.open_stream(arrow.content).read_all().column("cur_avg").to_pylist() == [3.5]
