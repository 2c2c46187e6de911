"""Reading config text: YAML whose mappings may not repeat a key, and which ``--set`` values stay text. Apart from
``config.py`` so that module stays the sections and their checks."""

from __future__ import annotations

import types
import typing
from typing import Any

import yaml


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error: PyYAML keeps the last one, so a
    second ``router:`` section would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": YAML's own merge, resolved below
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the safe loader itself refuses it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice (lines {first} and {line}); the second would replace "
                    f"the first: merge them", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


def is_text_field(model: Any, parts: list[str]) -> bool:
    """Whether the field at ``parts`` of the pydantic ``model`` takes plain text (``str`` or ``str | None``):
    ``--set`` keeps such a value as typed instead of reading it as YAML."""
    annotation = None
    for name in parts:
        fields = getattr(model, "model_fields", None)
        if not fields or name not in fields:
            return False
        annotation = fields[name].annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)] \
            if typing.get_origin(annotation) in (typing.Union, types.UnionType) else [annotation]
        model = args[0] if len(args) == 1 else None
    return model is str
