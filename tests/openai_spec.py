"""OpenAI's published Images schemas (tests/data/openai-images-openapi.yaml) as plain JSON Schema, and validators
for what the server sends back (JSON bodies and server-sent events)."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import yaml

SPEC = Path(__file__).parent / "data" / "openai-images-openapi.yaml"


@lru_cache(maxsize=1)
def _schemas() -> dict:
    return yaml.safe_load(SPEC.read_text())["components"]["schemas"]


def _plain(node, schemas):
    """Inline ``$ref`` s, turn OpenAPI's ``nullable: true`` into ``anyOf [..., null]``, drop OpenAPI-only keys."""
    if isinstance(node, list):
        return [_plain(n, schemas) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _plain(copy.deepcopy(schemas[node["$ref"].rsplit("/", 1)[1]]), schemas)
    out = {k: _plain(v, schemas) for k, v in node.items()
           if k not in ("discriminator", "example", "x-oaiMeta", "x-oaiTypeLabel", "x-stainless-const", "nullable")}
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


def schema(name: str) -> dict:
    return _plain(copy.deepcopy(_schemas()[name]), _schemas())


def validator(name: str):
    import jsonschema

    return jsonschema.Draft202012Validator(schema(name))


def check(name: str, instance) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``instance`` is valid against the spec's schema ``name``."""
    validator(name).validate(instance)


def parse_sse(text: str) -> list[tuple[str | None, str]]:
    """(event, data) of each server-sent event with data; comment lines are skipped as SSE clients skip them."""
    events, event, data = [], None, []
    for line in text.split("\n"):
        if line == "":
            if data:
                events.append((event, "\n".join(data)))
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if data:
        events.append((event, "\n".join(data)))
    return events


def check_stream(text: str) -> list[dict]:
    """Validate a whole event stream: each event is a spec event (by its type) or an error envelope, and the
    stream ends with [DONE]. Returns the decoded events."""
    events = parse_sse(text)
    assert events and events[-1][1] == "[DONE]", text[-500:]
    out = []
    for event, data in events[:-1]:
        body = json.loads(data)
        if event != "error":  # clients dispatch on the event line or on data.type: the two must agree
            assert event == body.get("type"), (event, body.get("type"))
        if event == "error":
            check("ErrorResponse", body)
        elif body.get("type") == "image_generation.partial_image":
            check("ImageGenPartialImageEvent", body)
        elif body.get("type") == "image_generation.completed":
            check("ImageGenCompletedEvent", body)
        elif body.get("type") == "image_edit.partial_image":
            check("ImageEditPartialImageEvent", body)
        elif body.get("type") == "image_edit.completed":
            check("ImageEditCompletedEvent", body)
        else:
            raise AssertionError(f"event {event!r} is not in the spec: {data[:200]}")
        out.append(body)
    return out


def strategy(node: dict):
    """A Hypothesis strategy for instances of a (plain, ``schema()``-converted) JSON Schema: the subset the
    Images request schema uses (object, string, integer, number, boolean, null, enum, anyOf, bounds). Optional
    properties are each present or absent; every value drawn is valid against the schema."""
    from hypothesis import strategies as st

    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "anyOf" in node:
        return st.one_of([strategy(n) for n in node["anyOf"]])
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties", {})
        required = set(node.get("required", ()))

        @st.composite
        def obj(draw):
            out = {}
            for name, sub in props.items():
                if name in required or draw(st.booleans()):
                    out[name] = draw(strategy(sub))
            return out

        return obj()
    if kind == "string":
        return st.text(min_size=node.get("minLength", 0), max_size=node.get("maxLength", 30))
    if kind == "integer":
        return st.integers(node.get("minimum"), node.get("maximum"))
    if kind == "number":
        return st.floats(node.get("minimum"), node.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    raise NotImplementedError(f"schema construct not supported here: {sorted(node)}")
