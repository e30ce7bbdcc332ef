"""Object aggregations over HTTP equal the Python client's, from a real pipeline run into Redis
(events over 3 partitions): first/last text with unicode and empty strings, last_n lists (empty
for an idle window), count_distinct, percentile, top_k lists of {value, count} structs, numeric
features beside them and a derived feature reading them, in JSON and Arrow, for live, idle,
expired and unknown entities."""

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
    object_events,
    online,
    same_minute,
    world,
)


@pytest.fixture(scope="module")
def objects(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with world(services, tmp_path_factory.mktemp("objs"), "object_view", object_events) as w:
        yield w


def test_bare_view_json_equals_the_client_with_statuses(objects: World) -> None:
    cols = assert_json_equals_client(objects, USERS)
    # Independent of the client, from object_events: u1's hour holds é, "", é, None, "a b", é, x*300.
    assert cols["m_first_h"]["values"][0] == "é"
    assert cols["m_last_h"]["values"][0] == "x" * 300
    newest, *tied = cols["m_last3_h"]["values"][0]  # "é" and "a b" share a time: offset order
    assert newest == "x" * 300 and sorted(tied) == ["a b", "é"]
    assert cols["m_top2_h"]["values"][0] == [{"value": "é", "count": 3}, {"value": "", "count": 1}]
    assert cols["m_distinct_h"]["values"][0] == 4.0
    assert cols["m_last_h"]["values"][3] == "🙂"
    assert cols["m_last3_r"]["values"][3] == [] and cols["m_last3_r"]["statuses"][3] == "PRESENT"
    assert cols["m_last_r"]["values"][3] is None and cols["m_last_r"]["statuses"][3] == "NULL_VALUE"
    assert cols["m_last_h"]["values"][4] is None and cols["m_last_h"]["statuses"][4] == "NULL_VALUE"
    assert cols["distinct_share"]["values"][0] == 4.0 / 7
    for name, col in cols.items():
        if name == "user_id":
            continue
        assert col["statuses"][1] == "OUTSIDE_MAX_AGE", name
        assert col["statuses"][2] == "NOT_FOUND", name
        assert col["statuses"][0] == "PRESENT", name


def test_arrow_equals_the_client(objects: World) -> None:
    table = assert_arrow_equals_client(objects, USERS)
    assert table.schema.field("m_last_h").type == pa.string()
    assert table.schema.field("m_last3_h").type == pa.list_(pa.string())
    top = table.schema.field("m_top2_h").type
    assert pa.types.is_list(top) and pa.types.is_struct(top.value_type)
    assert table.schema.field("x_p50_h").type == pa.float64()
    assert table.schema.field("n_h").type == pa.int64()
    assert table.column("m_last3_r__status").to_pylist()[2:4] == ["NOT_FOUND", "PRESENT"]


def test_named_features_mixed_with_numeric_ones(objects: World) -> None:
    wanted = ["picks:x_sum_h", "picks:m_top2_r", "picks:distinct_share", "picks:x_p50_h"]
    users = ["u4", "u1", "u1", "nobody"]
    for arrow in (False, True):
        resp, expected = online(objects, wanted, users, arrow=arrow)
        if arrow:
            table = pa.ipc.open_stream(resp.content).read_all()
            got = {ref: table.column(ref.split(":")[1]).to_pylist() for ref in wanted}
        else:
            got = {ref: col["values"] for ref, col in zip(wanted, resp.json()["results"][1:], strict=True)}
        for ref in wanted:
            assert got[ref] == expected.values[ref], (ref, arrow)


def test_numeric_only_requests_of_an_object_view(objects: World) -> None:
    """The fast path serves an object view's numeric features (reading no object records)."""
    wanted = ["picks:x_sum_h", "picks:n_r"]
    resp, expected = online(objects, wanted, USERS)
    for ref, col in zip(wanted, resp.json()["results"][1:], strict=True):
        assert col["values"] == expected.values[ref], ref


def test_vector_equals_the_client(objects: World) -> None:
    for user in ("u1", "u4", "u3"):
        resp, at = same_minute(lambda u=user: objects.server.get(f"/features/picks/{u}"))
        assert resp.status_code == 200, resp.text
        expected = objects.store.get_online_features(["picks"], [user], as_of=at)
        assert resp.json()["features"] == {k.split(":")[1]: v[0] for k, v in expected.values.items()}
    some = objects.server.get("/features/picks/u1?features=m_first_h,m_last3_h").json()
    assert some["features"]["m_first_h"] == "é" and len(some["features"]["m_last3_h"]) == 3
    arrow = objects.server.get("/features/picks/u4", headers=ARROW)
    assert arrow.status_code == 200, arrow.text
    assert pa.ipc.open_stream(arrow.content).read_all().column("m_last_h").to_pylist() == ["🙂"]


def test_arrow_columns_of_nulls_keep_their_types(objects: World) -> None:
    """Only unknown entities: every object value is null or empty, the columns keep their types."""
    wanted = ["picks:m_last_r", "picks:m_last3_r", "picks:m_top2_r", "picks:x_last2_h", "picks:x_p50_r"]
    resp, expected = online(objects, wanted, ["nobody", "u3"], arrow=True)
    table = pa.ipc.open_stream(resp.content).read_all()
    for ref in wanted:
        assert table.column(ref.split(":")[1]).to_pylist() == expected.values[ref], ref
    assert table.schema.field("m_last_r").type == pa.string()
    assert table.schema.field("m_last3_r").type == pa.list_(pa.string())
    assert table.schema.field("x_last2_h").type == pa.list_(pa.float64())
    top = table.schema.field("m_top2_r").type
    assert top == pa.list_(pa.struct([("value", pa.string()), ("count", pa.int64())]))
    assert table.column("m_last_r__status").to_pylist() == ["NOT_FOUND", "NOT_FOUND"]
