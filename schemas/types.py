"""Field types shared by every config block.

DeepSpeed users write sizes as `5e8`, `"5e8"` or `500000000`, and leave fields they want
decided as `"auto"`. These types accept exactly those spellings and nothing looser:

- `Auto` is a typed value, never a string. Validation turns `"auto"` into the singleton
  `AUTO`; serialisation turns it back into `"auto"`, so dumps round-trip.
- `count(...)` is an integer that also takes an integral float (`1e9`) or a numeric string
  (`"5e8"`), as DeepSpeed accepts them; booleans and fractions are refused.
- `real(...)` is a float that also takes a numeric string (`"1e-3"`).

Each type is one plain validator, so a bad value gives one message, not one per
member of a union.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError, core_schema


class Auto:
    """The value "auto": a field that compile or autotune will decide and record."""

    _instance: "Auto | None" = None

    def __new__(cls) -> "Auto":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "AUTO"

    def __str__(self) -> str:
        return "auto"

    def __reduce__(self):  # pickles to the same singleton
        return (Auto, ())

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _parse_auto,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda _: "auto"),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict:
        return {"const": "auto"}


AUTO = Auto()


def is_auto(value: object) -> bool:
    return value is AUTO


def _parse_auto(value: object) -> Auto:
    if is_auto_input(value):
        return AUTO
    raise PydanticCustomError("auto", "expected 'auto'")


def is_auto_input(value: object) -> bool:
    return value is AUTO or (isinstance(value, str) and value.strip().lower() == "auto")


def _serialize(value: object) -> object:
    return "auto" if value is AUTO else value


class FrozenModel(BaseModel):
    """Base of compiled, immutable data (Plan sections, cluster and model specs).

    Validators are built on first use, so importing the schemas for `zeroplan validate`
    does not pay for them."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True, use_attribute_docstrings=True)


class StrictModel(BaseModel):
    """Base of every config block: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(
        extra="forbid", validate_default=True, populate_by_name=True, use_attribute_docstrings=True
    )

    def given(self) -> set[str]:
        """Field names the user wrote (as opposed to defaults)."""
        return set(self.model_fields_set)


def _bounds_text(ge: float | None, gt: float | None, le: float | None) -> str:
    parts = []
    if gt is not None:
        parts.append(f"> {gt:g}")
    if ge is not None:
        parts.append(f">= {ge:g}")
    if le is not None:
        parts.append(f"<= {le:g}")
    return " and ".join(parts)


def _check_bounds(number: float, *, ge: float | None, gt: float | None, le: float | None) -> None:
    low_ok = (ge is None or number >= ge) and (gt is None or number > gt)
    if low_ok and (le is None or number <= le):
        return
    raise PydanticCustomError("out_of_range", "must be {bounds}", {"bounds": _bounds_text(ge, gt, le)})


def _as_number(value: object, kind: str) -> float:
    if isinstance(value, bool):
        raise PydanticCustomError("type", "expected {kind}, got a boolean", {"kind": kind})
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip().replace("_", ""))
        except ValueError:
            pass
    raise PydanticCustomError("type", "expected {kind}", {"kind": kind})


def _count_validator(*, ge: float | None, le: float | None, auto: bool):
    kind = "an integer" + (" or 'auto'" if auto else "")

    def validate(value: object) -> int | Auto:
        if auto and is_auto_input(value):
            return AUTO
        if not auto and is_auto_input(value):
            raise PydanticCustomError("auto_not_allowed", "'auto' is not accepted here; give {kind}", {"kind": kind})
        number = _as_number(value, kind)
        if isinstance(number, float):
            if not math.isfinite(number) or number != int(number):
                raise PydanticCustomError("type", "expected {kind}, got a fraction", {"kind": kind})
            number = int(number)
        _check_bounds(number, ge=ge, gt=None, le=le)
        return number

    return validate


def _real_validator(*, ge: float | None, gt: float | None, le: float | None, auto: bool):
    kind = "a number" + (" or 'auto'" if auto else "")

    def validate(value: object) -> float | Auto:
        if auto and is_auto_input(value):
            return AUTO
        if not auto and is_auto_input(value):
            raise PydanticCustomError("auto_not_allowed", "'auto' is not accepted here; give {kind}", {"kind": kind})
        number = float(_as_number(value, kind))
        if not math.isfinite(number):
            raise PydanticCustomError("type", "expected a finite number")
        _check_bounds(number, ge=ge, gt=gt, le=le)
        return number

    return validate


def _number_schema(base: str, *, ge, gt, le, auto: bool) -> dict:
    number: dict[str, Any] = {"type": base}
    if ge is not None:
        number["minimum"] = ge
    if gt is not None:
        number["exclusiveMinimum"] = gt
    if le is not None:
        number["maximum"] = le
    options: list[dict] = [number, {"type": "string", "pattern": r"^\s*[-+0-9.eE_]+\s*$"}]
    if auto:
        options.append({"const": "auto"})
    return {"anyOf": options}


def count(*, ge: int | None = 0, le: int | None = None, auto: bool = False) -> Any:
    """An integer field; `1e9`, `"5e8"` accepted; `auto=True` also takes "auto"."""
    return Annotated[
        int | Auto if auto else int,
        PlainValidator(_count_validator(ge=ge, le=le, auto=auto)),
        PlainSerializer(_serialize),
        WithJsonSchema(_number_schema("integer", ge=ge, gt=None, le=le, auto=auto)),
    ]


def real(*, ge: float | None = None, gt: float | None = None, le: float | None = None, auto: bool = False) -> Any:
    """A float field; numeric strings accepted; `auto=True` also takes "auto"."""
    return Annotated[
        float | Auto if auto else float,
        PlainValidator(_real_validator(ge=ge, gt=gt, le=le, auto=auto)),
        PlainSerializer(_serialize),
        WithJsonSchema(_number_schema("number", ge=ge, gt=gt, le=le, auto=auto)),
    ]


def _flag_validator(*, auto: bool):
    def validate(value: object) -> bool | Auto:
        if auto and is_auto_input(value):
            return AUTO
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        allowed = "true or false" + (" or 'auto'" if auto else "")
        raise PydanticCustomError("type", "expected {allowed}", {"allowed": allowed})

    return validate


def flag(*, auto: bool = False) -> Any:
    """A boolean: true/false (also 0/1 and "true"/"false", as JSON tools write them)."""
    options: list[dict] = [{"type": "boolean"}]
    if auto:
        options.append({"const": "auto"})
    return Annotated[
        bool | Auto if auto else bool,
        PlainValidator(_flag_validator(auto=auto)),
        PlainSerializer(_serialize),
        WithJsonSchema({"anyOf": options} if auto else {"type": "boolean"}),
    ]


def choice(*values: str, auto: bool = False, case_insensitive: bool = True) -> Any:
    """One of fixed strings. The canonical spelling is stored whatever case was given."""
    canonical = {v.lower() if case_insensitive else v: v for v in values}
    listed = ", ".join(repr(v) for v in values) + (", 'auto'" if auto else "")

    def validate(value: object) -> str | Auto:
        if auto and is_auto_input(value):
            return AUTO
        if isinstance(value, str):
            key = value.strip().lower() if case_insensitive else value
            if key in canonical:
                return canonical[key]
        raise PydanticCustomError("enum", "expected one of {listed}", {"listed": listed})

    options: list[dict] = [{"enum": list(values)}]
    if auto:
        options.append({"const": "auto"})
    return Annotated[
        str | Auto if auto else str,
        PlainValidator(validate),
        PlainSerializer(_serialize),
        WithJsonSchema({"anyOf": options} if auto else options[0]),
    ]


Flag = flag()
AutoFlag = flag(auto=True)
Size = count(ge=0)
"""A non-negative element or byte count; the field's docstring says which."""
AutoSize = count(ge=0, auto=True)
Positive = count(ge=1)
AutoPositive = count(ge=1, auto=True)
