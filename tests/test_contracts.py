"""loader/contracts: the JSON Schemas and the AsyncAPI document the package ships.

The end-to-end tests check every message they read against these schemas (worker_tools
`candles`, `telemetry`, `stop_command`); here: the files are what the structs make, every
reference resolves, the schemas refuse what breaks the contract, and the CLI prints them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
from jsonschema import Draft202012Validator, ValidationError
from worker_tools import CANDLE_FIELDS, TELEMETRY_FIELDS, conforms

from loader import contracts
from loader.binance import Kline, RecordEncoder
from loader.schema import TelemetryEvent

FOLDER = Path(contracts.__file__).parent
SCHEMAS = ["candle", "telemetry", "control"]


def load(name: str) -> Any:
    return json.loads(contracts.committed(name))


@pytest.mark.parametrize("name", list(contracts.FILES))
def test_committed_files_are_what_the_structs_make(name: str) -> None:
    assert contracts.committed(name) == contracts.render(name), (
        f"loader/contracts/{contracts.FILES[name]} is stale: run `just contracts` and commit it"
    )


def test_every_file_is_in_the_package_folder() -> None:
    shipped = {p.name for p in FOLDER.iterdir() if p.suffix == ".json"}
    assert shipped == set(contracts.FILES.values())


def test_write_makes_every_file_and_says_which_changed(tmp_path: Path) -> None:
    (tmp_path / "candle.schema.json").write_bytes(contracts.committed("candle"))
    (tmp_path / "control.schema.json").write_bytes(b"{}")
    assert contracts.write(tmp_path) == ["telemetry", "control", "asyncapi"]
    for name, file in contracts.FILES.items():
        assert (tmp_path / file).read_bytes() == contracts.committed(name)
    assert contracts.write(tmp_path) == []


def test_a_struct_field_the_contract_does_not_describe_is_refused() -> None:
    class Renamed(msgspec.Struct):
        queue: str
        command: str

    with pytest.raises(ValueError, match="describe every field"):
        contracts._object(Renamed, contracts._CONTROL_FIELDS)


def test_schema_fields_are_the_readme_s() -> None:
    candle, telemetry = load("candle"), load("telemetry")
    assert candle["required"] == CANDLE_FIELDS
    assert list(candle["properties"]) == [*CANDLE_FIELDS, "is_closed"]
    assert telemetry["required"] == list(telemetry["properties"]) == TELEMETRY_FIELDS
    assert sorted(telemetry["properties"]["status"]["enum"]) == sorted(
        ["started", "loading", "interrupted", "error", "finished"]
    )


@pytest.mark.parametrize("name", SCHEMAS)
def test_schemas_are_valid_2020_12(name: str) -> None:
    schema = load(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    Draft202012Validator.check_schema(schema["$defs"]["key"])


# Keywords that mean the same in draft-07 (AsyncAPI Schema's base) and 2020-12.
SHARED_KEYWORDS = {
    "$schema", "$defs", "$ref", "title", "description", "type", "properties", "required",
    "additionalProperties", "enum", "const", "pattern", "format", "minLength", "minimum", "if",
    "then", "examples",
}  # fmt: skip


def keywords(schema: dict[str, Any]) -> Iterator[str]:
    for keyword, value in schema.items():
        yield keyword
        if keyword in ("properties", "$defs"):
            for sub in value.values():
                yield from keywords(sub)
        elif keyword in ("if", "then", "additionalProperties") and isinstance(value, dict):
            yield from keywords(value)


@pytest.mark.parametrize("name", SCHEMAS)
def test_schemas_use_only_keywords_draft_07_reads_alike(name: str) -> None:
    assert set(keywords(load(name))) <= SHARED_KEYWORDS


def refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(document: str, ref: str) -> object:
    """The node `ref` points at, relative to `document` (a file of loader/contracts)."""
    file, _, pointer = ref.partition("#")
    target = json.loads((FOLDER / (file or document)).read_bytes())
    for escaped in filter(None, pointer.split("/")):
        token = escaped.replace("~1", "/").replace("~0", "~")
        assert isinstance(target, dict), f"{ref}: {token!r} in a non-object"
        assert token in target, f"{ref}: no {token!r}"
        target = target[token]
    return target


def test_every_asyncapi_ref_resolves() -> None:
    document = load("asyncapi")
    assert document["asyncapi"] == "3.0.0"
    found = list(refs(document))
    for ref in found:
        assert resolve("asyncapi.json", ref) is not None, ref
    files = {ref.partition("#")[0] for ref in found} - {""}
    assert files == {contracts.FILES[name] for name in SCHEMAS}
    for name in SCHEMAS:
        assert not list(refs(load(name)))


def test_asyncapi_operations_send_data_and_events_and_receive_control() -> None:
    document = load("asyncapi")
    actions = {
        op["channel"]["$ref"]: op["action"] for op in document["operations"].values()
    }  # fmt: skip
    assert actions == {
        "#/channels/candles": "send",
        "#/channels/events": "send",
        "#/channels/control": "receive",
    }
    for op in document["operations"].values():
        # AsyncAPI 3.0: an operation's messages are its channel's.
        for message in op["messages"]:
            assert message["$ref"].startswith(op["channel"]["$ref"] + "/messages/")
    for message in document["components"]["messages"].values():
        schema_file = message["payload"]["$ref"]
        assert message["bindings"]["kafka"]["key"] == {"$ref": f"{schema_file}#/$defs/key"}
    sends = [op for op in document["operations"].values() if op["action"] == "send"]
    for op in sends:
        assert op["bindings"]["kafka"]["x-acks"] == "all"
        assert op["bindings"]["kafka"]["x-enable-idempotence"] is True


def candle() -> dict[str, Any]:
    example: dict[str, Any] = load("candle")["examples"][0]
    return example


def test_the_example_candle_conforms() -> None:
    conforms("candle", b"BTCUSDT-1m", candle())


@pytest.mark.parametrize(
    "change",
    [
        {"open": "60685.22000000"},  # a string price
        {"open_time": 1.5},
        {"number_of_trades": "12"},
        {"interval": "2m"},
        {"interval": "1m "},
        {"is_closed": "false"},
        {"symbol": None},
        {"extra": 1},  # a field the contract does not have
    ],
)
def test_a_wrong_candle_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        conforms("candle", b"BTCUSDT-1m", candle() | change)


@pytest.mark.parametrize("field", CANDLE_FIELDS)
def test_a_candle_missing_a_field_is_refused(field: str) -> None:
    value = candle()
    del value[field]
    with pytest.raises(ValidationError):
        conforms("candle", b"BTCUSDT-1m", value)


@pytest.mark.parametrize("key", [b"BTCUSDT", b"BTCUSDT-2m", b"-1m", None])
def test_a_wrong_candle_key_is_refused(key: bytes | None) -> None:
    with pytest.raises(ValidationError):
        conforms("candle", key, candle())


def test_what_the_encoder_publishes_conforms() -> None:
    kline = Kline(
        open_time=1767225600000, close_time=1769903999999, symbol="ETHUSDT", interval="1M",
        first_trade_id=1, last_trade_id=7, open="3000.00000000", close="3050.00000000",
        high="3100.10000000", low="2999.00000000", volume="10.00000000", number_of_trades=7,
        is_closed=False, quote_asset_volume="30500.00000000",
        taker_buy_base_asset_volume="5.00000000", taker_buy_quote_asset_volume="15250.00000000",
    )  # fmt: skip
    for with_state in (False, True):
        key, value = RecordEncoder(with_state=with_state)(kline)
        published = json.loads(value, parse_float=Decimal)
        conforms("candle", key, published)
        assert published["open"] == Decimal("3000.00000000")
        assert ("is_closed" in published) is with_state


def event(**change: Any) -> dict[str, Any]:
    made = TelemetryEvent(
        queue_id="q1", symbol="BTCUSDT", type="ws_candles", status="loading", message="ok",
        records_written=3, finished=False, producer="loader", timestamp=1767225600.25,
    )  # fmt: skip
    value: dict[str, Any] = msgspec.to_builtins(made)
    return value | change


def test_a_telemetry_event_conforms() -> None:
    conforms("telemetry", b"q1", event())
    conforms("telemetry", b"q1", event(status="interrupted", finished=True))


@pytest.mark.parametrize(
    "change",
    [
        {"status": "stopped"},  # not one of the five
        {"finished": "false"},
        {"finished": True},  # a loading event is never final
        {"records_written": -1},
        {"timestamp": "now"},
        {"extra": 1},
    ],
)
def test_a_wrong_telemetry_event_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        conforms("telemetry", b"q1", event(**change))


def test_a_telemetry_event_missing_a_field_is_refused() -> None:
    for field in TELEMETRY_FIELDS:
        value = event()
        del value[field]
        with pytest.raises(ValidationError):
            conforms("telemetry", b"q1", value)


def test_control_commands() -> None:
    conforms("control", b"q1", {"command": "stop", "queue_id": "q1"})
    # The loader skips fields it does not know, and reads no key.
    conforms("control", None, {"command": "stop", "queue_id": "q1", "reason": "done"})
    for wrong in ({"command": "pause", "queue_id": "q1"}, {"command": "stop"}, {"queue_id": "q1"}):
        with pytest.raises(ValidationError):
            conforms("control", None, wrong)


def schema_command(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "loader", "schema", *args],
        check=False,
        capture_output=True,
        timeout=60,
    )


def test_the_cli_prints_each_file_and_lists_them() -> None:
    for name in contracts.FILES:
        done = schema_command(name)
        assert (done.returncode, done.stdout) == (0, contracts.committed(name))
    listed = schema_command().stdout.decode().splitlines()
    assert [line.split("\t")[0] for line in listed] == list(contracts.FILES)
    assert all(Path(line.split("\t")[1]).is_file() for line in listed)


def test_the_cli_refuses_an_unknown_name_with_exit_2() -> None:
    done = schema_command("candles")
    assert done.returncode == 2
    assert b"invalid choice: 'candles'" in done.stderr
