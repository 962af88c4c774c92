"""Value serialisation (openbox-core-protocol.md §2.1)."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import unittest

import support  # noqa: F401  (import path)

import temporalio.api.common.v1
import temporalio.common
import temporalio.converter

from openbox_hook.serialize import serialize_args, serialize_value


@dataclasses.dataclass
class Inner:
    data: bytes
    tags: tuple[str, ...]


@dataclasses.dataclass
class Outer:
    name: str
    inner: Inner
    scores: dict[str, float]


class Model:
    """Duck-typed pydantic v2 model: what matters is model_dump(mode="json")."""

    def model_dump(self, *, mode: str) -> dict:
        assert mode == "json"
        return {"when": "2026-01-15T10:30:45Z", "n": 1}


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


def payload(data: bytes, encoding: bytes) -> temporalio.api.common.v1.Payload:
    return temporalio.api.common.v1.Payload(metadata={"encoding": encoding}, data=data)


class SerializeTest(unittest.TestCase):
    def test_json_scalars_pass_through(self) -> None:
        for value in (None, True, False, 0, -7, 2**70, 1.5, "", "text ✓"):
            self.assertEqual(serialize_value(value), value)
            self.assertIs(type(serialize_value(value)), type(value))

    def test_non_finite_floats_become_text(self) -> None:
        self.assertEqual(
            serialize_value([float("nan"), float("inf"), -float("inf")]), ["nan", "inf", "-inf"]
        )

    def test_bytes_are_utf8_text_or_base64(self) -> None:
        self.assertEqual(serialize_value(b"caf\xc3\xa9"), "café")
        self.assertEqual(serialize_value(b"\xff\x00\x01"), "/wAB")
        self.assertEqual(serialize_value(bytearray(b"ab")), "ab")
        self.assertEqual(serialize_value(memoryview(b"ab")), "ab")

    def test_dataclass_is_an_object_by_field_recursively(self) -> None:
        value = Outer("x", Inner(b"\xff", ("a", "b")), {"s": 0.5})
        self.assertEqual(
            serialize_value(value),
            {"name": "x", "inner": {"data": "/w==", "tags": ["a", "b"]}, "scores": {"s": 0.5}},
        )
        # The class itself is not an instance: it goes through the str() fallback.
        self.assertEqual(serialize_value(Inner), str(Inner))

    def test_lists_tuples_dicts(self) -> None:
        self.assertEqual(serialize_value((1, [2, (3,)])), [1, [2, [3]]])
        self.assertEqual(
            serialize_value({"a": b"x", 2: None, True: 1, None: 2, 1.5: 3, (1, 2): 4}),
            {"a": "x", "2": None, "true": 1, "null": 2, "1.5": 3, "(1, 2)": 4},
        )

    def test_payload_is_decoded_as_json(self) -> None:
        converted = temporalio.converter.DataConverter.default.payload_converter.to_payloads(
            [{"prompt": "hi"}, None, b"\x01\x02"]
        )
        self.assertEqual(serialize_value(converted), [{"prompt": "hi"}, None, "<Payload: 2 bytes>"])
        self.assertEqual(serialize_value(payload(b"[1,2]", b"json/plain")), [1, 2])
        self.assertEqual(
            serialize_value(temporalio.common.RawValue(payload(b'{"k":1}', b"json/plain"))),
            {"k": 1},
        )

    def test_pydantic_style_model_uses_model_dump_json_mode(self) -> None:
        self.assertEqual(serialize_value([Model()]), [{"when": "2026-01-15T10:30:45Z", "n": 1}])

    def test_everything_else_goes_through_json_with_str_fallback(self) -> None:
        when = datetime.datetime(2026, 1, 15, 10, 30, 45)
        self.assertEqual(serialize_value(when), str(when))
        self.assertEqual(serialize_value(decimal.Decimal("1.10")), "1.10")
        self.assertEqual(serialize_value(Color.RED), "Color.RED")
        self.assertEqual(serialize_value(Level.HIGH), 3)
        self.assertEqual(serialize_value({1, 2}), "{1, 2}")

    def test_cycles_are_cut(self) -> None:
        loop: list = [1]
        loop.append(loop)
        self.assertEqual(serialize_value(loop), [1, "[1, [...]]"])

    def test_never_raises(self) -> None:
        class Hostile:
            def __str__(self) -> str:
                raise RuntimeError("no")

            def __repr__(self) -> str:
                raise RuntimeError("no")

        self.assertEqual(
            serialize_value(Hostile()),
            "<unserialisable SerializeTest.test_never_raises.<locals>.Hostile>",
        )
        deep: list = []
        for _ in range(100_000):
            deep = [deep]
        self.assertIsInstance(serialize_value(deep), str)

    def test_args_are_an_array_and_the_result_is_valid_json(self) -> None:
        self.assertEqual(serialize_args([]), [])
        args = serialize_args([Outer("n", Inner(b"", ()), {"x": float("nan")}), b"\x80"])
        json.dumps(args, allow_nan=False)
        self.assertEqual(args[1], "gA==")


if __name__ == "__main__":
    unittest.main()
