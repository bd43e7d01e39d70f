"""What a request asks its output to match, as one `StructuredOutputs` for the engine: OpenAI's
`response_format` (json_object, json_schema strict or not), vLLM's extras `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and their newer form `structured_outputs`.

Each spec is compiled by llguidance when the request is validated, so a bad schema, regex or
grammar is a 400 that names the problem before anything is queued.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, PrivateAttr, ValidationInfo, field_validator, model_validator

from kvpilot.runtime.engine.guidance import GrammarError, check
from kvpilot.runtime.engine.sampling import StructuredOutputs

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
STRUCTURED_OUTPUTS_KEYS = ("json", "json_object", "regex", "choice", "grammar")


def checked(spec: StructuredOutputs) -> StructuredOutputs:
    try:
        check(spec)
    except GrammarError as err:
        raise ValueError(f"cannot be compiled: {err}") from None
    return spec


def schema_text(schema: Any, what: str) -> str:
    """A JSON schema as text; it must be a JSON object (given as one, or as a string holding one)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as err:
            raise ValueError(f"{what} is not valid JSON: {err}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(schema).__name__}")
    return json.dumps(schema)


def response_format_spec(value: Any) -> StructuredOutputs | None:
    """The spec of OpenAI's response_format; ValueError naming what is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        kind = value.get("type") if isinstance(value, dict) else value
        raise ValueError(f"type {kind!r} is not supported: use one of {', '.join(RESPONSE_FORMATS)}")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return checked(StructuredOutputs(json_object=True))
    body = value.get("json_schema")
    if not isinstance(body, dict) or "name" not in body:
        raise ValueError("json_schema must be an object with a name and a schema")
    if body.get("schema") is None:  # OpenAI makes schema optional: then any JSON object
        return checked(StructuredOutputs(json_object=True))
    strict = bool(body.get("strict"))
    # strict: a schema keyword llguidance does not implement is refused; otherwise it is ignored
    return checked(StructuredOutputs(json=schema_text(body["schema"], "json_schema.schema"), lenient=not strict))


def guided_spec(field: str, value: Any) -> StructuredOutputs | None:
    """The spec of one of vLLM's guided_* fields."""
    if value is None:
        return None
    if field == "guided_json":
        return checked(StructuredOutputs(json=schema_text(value, "guided_json")))
    if field == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise ValueError("must be a non-empty list of strings")
        return checked(StructuredOutputs(choice=tuple(value)))
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    return checked(StructuredOutputs(regex=value) if field == "guided_regex" else StructuredOutputs(grammar=value))


def structured_outputs_spec(value: Any) -> StructuredOutputs | None:
    """The spec of vLLM's `structured_outputs` object ({"json": ...}, {"regex": ...}, ...)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("must be an object with one of " + ", ".join(STRUCTURED_OUTPUTS_KEYS))
    unknown = sorted(set(value) - set(STRUCTURED_OUTPUTS_KEYS))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} not supported: give one of {', '.join(STRUCTURED_OUTPUTS_KEYS)}")
    given = {k: v for k, v in value.items() if v not in (None, False)}
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(STRUCTURED_OUTPUTS_KEYS)}; got {sorted(given) or 'none'}")
    key, spec = next(iter(given.items()))
    if key == "json_object":
        return checked(StructuredOutputs(json_object=True))
    return guided_spec(f"guided_{key}", spec)


def one_spec(specs: dict[str, StructuredOutputs | None]) -> StructuredOutputs | None:
    """The request's one spec; ValueError when several fields ask for one."""
    given = [name for name, spec in specs.items() if spec is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} each constrain the output: send only one of them")
    return specs[given[0]] if given else None


class StructuredRequest(BaseModel):
    """The request fields that constrain the output, each compiled as it is validated (400 naming the fault)."""

    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    _structured: StructuredOutputs | None = PrivateAttr(None)

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: Any) -> Any:
        response_format_spec(value)
        return value

    @field_validator(*GUIDED_FIELDS)
    @classmethod
    def _guided(cls, value: Any, info: ValidationInfo) -> Any:
        guided_spec(info.field_name, value)
        return value

    @field_validator("structured_outputs")
    @classmethod
    def _structured_outputs(cls, value: Any) -> Any:
        structured_outputs_spec(value)
        return value

    @model_validator(mode="after")
    def _one_spec(self) -> StructuredRequest:
        specs = {"response_format": response_format_spec(self.response_format),
                 "structured_outputs": structured_outputs_spec(self.structured_outputs)}
        specs |= {name: guided_spec(name, getattr(self, name)) for name in GUIDED_FIELDS}
        self._structured = one_spec(specs)
        return self

    def structured(self) -> StructuredOutputs | None:
        """What the output must match, from whichever field asked (None: free text)."""
        return self._structured
