"""One request over a numeric view and an object view: the stacked answer keeps counts as ints,
floats as floats and object columns typed, in JSON and Arrow (the blocks come from each view's
reader, as the server reads them)."""

from __future__ import annotations

import msgspec
import numpy as np
import pyarrow as pa

from engine.definitions import Aggregation
from featurestream.server.app import _stack
from featurestream.server.encode import Answer, arrow_table, json_online
from featurestream.server.reads import STATUSES, ViewReader
from tests.server_helpers import spend_view
from tests.server_mixed_helpers import object_view

NOW = 1_780_000_000_000


def test_numeric_and_object_blocks_stack_and_encode() -> None:
    spend, picks = spend_view("t"), object_view("t")
    numeric = [spend.aggregation("tx_count"), spend.aggregation("amount_sum")]
    objects = [picks.aggregation(n) for n in ("m_last_h", "m_top2_h", "n_h", "x_p50_h", "distinct_share")]
    a = ViewReader(spend).read([b"", b""], NOW, numeric)
    b = ViewReader(picks).read([b"", b""], NOW, objects, objects=[b"", b""])  # unknown entities
    block = _stack([a, b])
    assert block.values.dtype == object and len(block.types) == 7
    assert STATUSES[block.status].tolist() == [["NOT_FOUND"] * 2] * 7
    aggs: list[Aggregation] = [*numeric, *objects]  # type: ignore[list-item]
    answer = Answer([f.feature_name for f in aggs], aggs, block)  # type: ignore[arg-type]
    doc = msgspec.json.decode(json_online({"user_id": ["a", "b"]}, answer))
    got = {r: col["values"] for r, col in zip(answer.names, doc["results"][1:], strict=True)}
    assert got == {
        "tx_count": [0, 0],
        "amount_sum": [0.0, 0.0],
        "m_last_h": [None, None],
        "m_top2_h": [[], []],
        "n_h": [0, 0],
        "x_p50_h": [None, None],
        "distinct_share": [None, None],
    }
    table = arrow_table({"user_id": ["a", "b"]}, answer)
    assert table.schema.field("tx_count").type == pa.int64()
    assert table.schema.field("n_h").type == pa.int64()
    assert table.schema.field("amount_sum").type == pa.float64()
    assert table.schema.field("m_last_h").type == pa.string()
    assert table.schema.field("m_top2_h").type == pa.list_(
        pa.struct([("value", pa.string()), ("count", pa.int64())])
    )
    assert table.column("x_p50_h").to_pylist() == [None, None]
    assert np.isnan(block.times[0]).all()
