"""The route table, its OpenAPI rendering, selectors and the pure helpers of the operator API."""

from __future__ import annotations

import json

import pytest
from openapi_spec_validator import validate

from edgewise.cloud import openapi as oa
from edgewise.cloud import operator_api
from edgewise.cloud.operator_data import missing_ranges
from edgewise.errors import ConfigError


def test_every_operator_route_has_its_handler_and_back() -> None:
    assert {r.name for r in oa.OPERATOR_ROUTES} == set(operator_api.HANDLERS)
    keys = [(r.method, r.path) for r in oa.ALL_ROUTES]
    assert len(keys) == len(set(keys)), "a (method, path) is listed twice"
    names = [r.name for r in oa.ALL_ROUTES]
    assert len(names) == len(set(names)), "operationIds must be unique"


def test_mutating_routes_are_never_open_to_viewers() -> None:
    for r in oa.OPERATOR_ROUTES:
        if r.method != "GET":
            assert r.mutating and r.access in ("operator", "admin"), r.name
        else:
            assert not r.mutating, r.name
    admin = {r.name for r in oa.OPERATOR_ROUTES if r.access == "admin"}
    assert admin == {"create_operator_token", "list_operator_tokens", "revoke_operator_token",
                     "revoke_node", "decommission_node"}


def test_document_is_valid_openapi_31_without_refs() -> None:
    doc = oa.document(oa.path_items(oa.ALL_ROUTES), "0.0.0")
    validate(doc)
    text = json.dumps(doc)
    assert "$ref" not in text and "$defs" not in text
    assert doc["openapi"] == "3.1.0"
    assert sorted(doc["paths"]) == sorted({r.path for r in oa.ALL_ROUTES})
    nodes = doc["paths"]["/v1/nodes"]["get"]
    assert [(p["name"], p["in"], p["required"]) for p in nodes["parameters"]] == [
        ("selector", "query", False), ("limit", "query", False), ("after", "query", False)]
    detail = doc["paths"]["/v1/nodes/{node_id}"]["get"]
    assert detail["parameters"][0] == {"name": "node_id", "in": "path", "required": True,
                                       "schema": {"type": "string"}}
    streams = detail["responses"]["200"]["content"]["application/json"]["schema"][
        "properties"]["streams"]
    assert "records_stored" in streams["items"]["properties"]  # nested model inlined
    enrol = doc["paths"]["/v1/device/enrol"]["post"]
    assert set(enrol["responses"]) >= {"201", "400", "401"}
    assert "enrolment token" in enrol["description"]
    assert set(doc["paths"]["/v1/tokens/operator"]["get"]["responses"]) == {
        "200", "401", "403", "503"}


@pytest.mark.parametrize(("text", "labels"), [
    ("site=plant1", {"site": "plant1"}),
    ("site=plant1,line=1", {"site": "plant1", "line": "1"}),
    (" site = plant1 , line=1 ,", {"site": "plant1", "line": "1"}),
    ("a=1,a=1", {"a": "1"}),
    ("tier=", {"tier": ""}),
])
def test_selector_parsing(text: str, labels: dict[str, str]) -> None:
    assert oa.parse_selector(text) == labels


@pytest.mark.parametrize(("text", "error", "words"), [
    ("", ValueError, "empty selector"),
    ("site", ValueError, "'site' is not key=value"),
    ("a=1=2", ValueError, "is not key=value"),
    ("a=1,a=2", ValueError, "a=1 and a=2"),
    ("Site=x", ConfigError, "invalid label key 'Site'"),
    ("site=a b", ValueError, "is not key=value"),
])
def test_selector_errors(text: str, error: type[Exception], words: str) -> None:
    with pytest.raises(error) as e:
        oa.parse_selector(text)
    assert words in str(e.value)


def test_missing_ranges() -> None:
    assert missing_ranges(0, []) == []
    assert missing_ranges(10, [(10, 5)]) == []
    assert missing_ranges(10, [(20, 5), (12, 3)]) == [(10, 2), (15, 5)]
    assert missing_ranges(10, [(15, 10), (18, 2), (30, 1)]) == [(10, 5), (25, 5)]


def test_config_request_rules() -> None:
    ok = oa.ConfigSetRequest(selector="site=a", config={"x": 1})
    assert ok.node is None and ok.pipelines is None
    for bad, words in [({"config": {"x": 1}}, "exactly one of node and selector"),
                       ({"node": "a", "selector": "s=1", "config": {}}, "exactly one"),
                       ({"node": "a"}, "nothing to set"),
                       ({"selector": "bad", "config": {"x": 1}}, "is not key=value"),
                       ({"node": "a", "config": {"setpoints": {}}}, "setpoints field")]:
        with pytest.raises(ValueError) as e:
            oa.ConfigSetRequest.model_validate(bad)
        assert words in str(e.value)


def test_every_operation_names_its_security_scheme() -> None:
    doc = oa.document(oa.path_items(oa.ALL_ROUTES), "0.0.0")
    schemes = doc["components"]["securitySchemes"]
    assert schemes["operatorToken"]["type"] == "http" and schemes["operatorToken"][
        "scheme"] == "bearer"
    assert schemes["deviceCertificate"]["type"] == "mutualTLS"
    for r in oa.ALL_ROUTES:
        security = doc["paths"][r.path][r.method.lower()]["security"]
        if r.access in ("viewer", "operator", "admin"):
            assert security == [{"operatorToken": []}], r.name
        elif r.access == "device":
            assert security == [{"deviceCertificate": []}], r.name
        else:
            assert security == [], r.name
    assert "429" in doc["paths"]["/v1/device/desired"]["get"]["responses"]
    assert "409" in doc["paths"]["/v1/device/enrol"]["post"]["responses"]
