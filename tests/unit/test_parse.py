"""Readings from JSON lines and documents: the fast path, the checked path and every reason."""

from __future__ import annotations

import numpy as np
import pytest

from edgewise.pipeline.sources.parse import (
    BadRecord,
    check_reading,
    parse_json_document,
    parse_json_lines,
    readings_from_dicts,
)


def cols(batch) -> dict[str, list]:
    return {k: v.tolist() for k, v in batch.columns.items()}


def test_fast_path_builds_typed_columns() -> None:
    lines = [b'{"sensor":"a","ts":1000.5,"value":1}', b'{"sensor":"b","ts":1001,"value":2.25}']
    batch, bad = parse_json_lines(lines)
    assert bad == []
    assert cols(batch) == {"sensor": ["a", "b"], "ts": [1000.5, 1001.0], "value": [1.0, 2.25]}
    assert batch["ts"].dtype == np.float64 and batch["value"].dtype == np.float64
    assert batch["sensor"].dtype == object


def test_millisecond_and_iso_timestamps() -> None:
    batch, bad = parse_json_lines([
        b'{"sensor":"a","ts":1700000000123,"value":1}',
        b'{"sensor":"a","ts":1700000000.5,"value":2}',
    ])
    assert bad == [] and batch["ts"].tolist() == [1700000000.123, 1700000000.5]
    batch, bad = parse_json_lines([
        b'{"sensor":"a","ts":"2024-01-01T00:00:00Z","value":1}',
        b'{"sensor":"a","ts":"2024-01-01T00:00:00+01:00","value":2}',
    ])
    assert bad == [] and batch["ts"].tolist() == [1704067200.0, 1704063600.0]


BAD_LINES = [
    (b'{"sensor":"a","ts":1,"value":', "malformed JSON: "),
    (b'{"sensor":"a","ts":1,"value":NaN}', "malformed JSON: "),
    (b'{"sensor":"a","ts":1,"value":Infinity}', "malformed JSON: "),
    (b'{"sensor":"a","ts":1,"value":1e400}', "malformed JSON: number is infinity"),
    (b"not json", "malformed JSON: "),
    (b'{"sensor":"a","ts":1,"value":"abc"}', "field 'value' is 'abc' (str), expected a number"),
    (b'{"sensor":"a","ts":1,"value":"1.5"}', "field 'value' is '1.5' (str), expected a number"),
    (b'{"sensor":"a","ts":1,"value":true}', "field 'value' is True (bool), expected a number"),
    (b'{"sensor":"a","ts":1,"value":null}', "field 'value' is None (NoneType), expected a number"),
    (b'{"sensor":5,"ts":1,"value":1}', "field 'sensor' is 5, expected a non-empty string"),
    (b'{"sensor":"","ts":1,"value":1}', "field 'sensor' is '', expected a non-empty string"),
    (b'{"sensor":"a","ts":true,"value":1}',
     "field 'ts' is True (bool), expected epoch seconds or ISO 8601 time"),
    (b'{"sensor":"a","ts":[1],"value":1}',
     "field 'ts' is list, expected epoch seconds or ISO 8601 time"),
    (b'{"sensor":"a","ts":"soon","value":1}',
     "field 'ts' is 'soon', not an ISO 8601 time or epoch seconds"),
    (b'{"sensor":"a","ts":"2024-01-01T00:00:00","value":1}',
     "field 'ts' is '2024-01-01T00:00:00' without a time zone; add 'Z' or '+00:00'"),
    (b'{"sensor":"a","value":1}', "missing field 'ts'; a reading needs sensor, ts and value"),
    (b'{"value":1}', "missing fields 'sensor', 'ts'; a reading needs sensor, ts and value"),
    (b"[1, 2, 3]", "expected a JSON object, got list"),
    (b'"text"', "expected a JSON object, got str"),
    (b"42", "expected a JSON object, got int"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_one_bad_line_among_good_ones(line: bytes, reason: str) -> None:
    good = [b'{"sensor":"a","ts":%d,"value":%d}' % (i, i) for i in range(1, 5)]
    batch, bad = parse_json_lines([*good[:2], line, *good[2:]])
    assert [i for i, _ in bad] == [2]
    assert bad[0][1].startswith(reason)
    assert batch["value"].tolist() == [1.0, 2.0, 3.0, 4.0]  # the others all kept, in order
    assert batch["ts"].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_bool_values_alone_are_not_taken_as_numbers() -> None:
    # all-bool columns never look numeric to numpy, but True next to numbers becomes 1.0
    batch, bad = parse_json_lines([
        b'{"sensor":"a","ts":true,"value":1.5}',
        b'{"sensor":"a","ts":2.5,"value":false}',
        b'{"sensor":"a","ts":3.5,"value":2.5}',
    ])
    assert [i for i, _ in bad] == [0, 1]
    assert batch["ts"].tolist() == [3.5] and batch["value"].tolist() == [2.5]


def test_bad_lines_come_back_in_line_order() -> None:
    lines = [b"x", b'{"sensor":"a","ts":1,"value":"v"}', b"y", b'{"sensor":"a","ts":1,"value":1}']
    batch, bad = parse_json_lines(lines)
    assert [i for i, _ in bad] == [0, 1, 2]
    assert batch.n == 1


def test_extra_fields_are_kept() -> None:
    batch, bad = parse_json_lines([
        b'{"sensor":"a","ts":1,"value":1,"unit":"C"}',
        b'{"sensor":"b","ts":2,"value":2,"quality":true}',
        b'{"sensor":"c","ts":3,"value":3}',
    ])
    assert bad == []
    assert cols(batch) == {
        "sensor": ["a", "b", "c"], "ts": [1.0, 2.0, 3.0], "value": [1.0, 2.0, 3.0],
        "unit": ["C", None, None], "quality": [None, True, None],
    }


def test_every_line_bad_gives_an_empty_batch() -> None:
    batch, bad = parse_json_lines([b"{", b"[]"])
    assert batch.n == 0 and [i for i, _ in bad] == [0, 1]
    assert parse_json_lines([])[0].n == 0


def test_json_document_object_or_array() -> None:
    batch, bad = parse_json_document(b'{"sensor":"a","ts":1,"value":2}')
    assert bad == [] and cols(batch) == {"sensor": ["a"], "ts": [1.0], "value": [2.0]}
    batch, bad = parse_json_document(
        b'[{"sensor":"a","ts":1,"value":2},{"sensor":"a","ts":2},{"sensor":"b","ts":3,"value":4}]'
    )
    assert batch["value"].tolist() == [2.0, 4.0]
    assert bad == [(1, "missing field 'value'; a reading needs sensor, ts and value")]
    batch, bad = parse_json_document(b"{oops")
    assert batch.n == 0 and bad[0][0] == 0 and bad[0][1].startswith("malformed JSON")


def test_readings_from_dicts_with_nan_and_inf() -> None:
    recs = [
        {"sensor": "a", "ts": 1.0, "value": float("nan")},
        {"sensor": "a", "ts": float("inf"), "value": 1.0},
        {"sensor": "a", "ts": 2.0, "value": float("-inf")},
        {"sensor": "a", "ts": 3.0, "value": 3.0},
    ]
    batch, bad = readings_from_dicts(recs)
    assert bad == [
        (0, "field 'value' is nan; NaN and infinity are not readings"),
        (1, "field 'ts' is inf, expected a finite time"),
        (2, "field 'value' is -inf; NaN and infinity are not readings"),
    ]
    assert cols(batch) == {"sensor": ["a"], "ts": [3.0], "value": [3.0]}


def test_check_reading_normalises() -> None:
    assert check_reading({"sensor": "a", "ts": 1_700_000_000_000, "value": 3}) == {
        "sensor": "a", "ts": 1_700_000_000.0, "value": 3.0
    }
    with pytest.raises(BadRecord, match="expected a JSON object, got NoneType"):
        check_reading(None)
