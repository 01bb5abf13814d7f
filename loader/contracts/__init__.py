"""The machine-readable contract of the three topics: a JSON Schema (2020-12) per message, made
from `loader/schema.py`'s structs, and an AsyncAPI 3.0 document that references them.

The JSON files next to this module are what ships and what `python -m loader schema NAME`
prints; `python -m loader schema --write` (`just contracts`) makes them again from the structs.
tests/test_contracts.py holds the two equal, so a field changed in `schema.py` without
regenerating fails there.

The payload schemas are read by AsyncAPI tools as AsyncAPI Schema (a superset of draft-07), so
they use only keywords that mean the same in draft-07 and 2020-12; `$defs` is reached only by
explicit JSON pointers.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Final

import msgspec

from loader.intervals import INTERVALS
from loader.schema import Candle, ControlCommand, TelemetryEvent

Json = dict[str, Any]

# The contract's own version (AsyncAPI `info.version`): a change a consumer must adapt to (a
# field removed, renamed or retyped) bumps the major; an added optional field the minor.
CONTRACT_VERSION: Final = "1.0.0"

# name -> file, in the order `python -m loader schema` lists them.
FILES: Final = {
    "candle": "candle.schema.json",
    "telemetry": "telemetry.schema.json",
    "control": "control.schema.json",
    "asyncapi": "asyncapi.json",
}

_DRAFT: Final = "https://json-schema.org/draft/2020-12/schema"
_STATUS_NOT_TERMINAL: Final = ["started", "loading"]

_DECIMAL: Final = (
    "A JSON number carrying exactly the digits Binance sent, trailing zeros included "
    "(60685.22000000). Read it as a decimal to keep it exact (Python "
    "json.loads(parse_float=decimal.Decimal), Jackson USE_BIG_DECIMAL_FOR_FLOATS, Go "
    "json.Decoder.UseNumber); a binary float rounds it."
)
_CANDLE_FIELDS: Final = {
    "open_time": "Open time of the candle, epoch milliseconds (UTC).",
    "open": "Open price, in the quote asset.",
    "high": "Highest price, in the quote asset.",
    "low": "Lowest price, in the quote asset.",
    "close": "Close price (the last price while the candle is open), in the quote asset.",
    "volume": "Base asset volume.",
    "close_time": "Close time of the candle, epoch milliseconds (UTC): its last millisecond.",
    "quote_asset_volume": "Quote asset volume.",
    "number_of_trades": "Number of trades in the candle.",
    "taker_buy_base_asset_volume": "Base asset volume bought by takers.",
    "taker_buy_quote_asset_volume": "Quote asset volume bought by takers.",
    "symbol": "The Binance symbol as Binance spells it (BTCUSDT).",
    "interval": (
        "The kline interval, one of Binance's: "
        + ", ".join(INTERVALS)
        + " (1M is the calendar month)."
    ),
    "is_closed": (
        "Only with CANDLES=all, which publishes in-progress updates too: false for an update, "
        "true for the closed candle. Absent with CANDLES=closed, where every message is a "
        "closed candle."
    ),
}
_TELEMETRY_FIELDS: Final = {
    "queue_id": "QUEUE_ID of the run; also the message key.",
    "symbol": (
        "SYMBOL as configured, or for many streams a summary "
        "(`*: 1500 symbols x 1m; 1500 streams`)."
    ),
    "type": "The TYPE setting (ws_candles by default).",
    "status": (
        "started first, loading every TELEMETRY_INTERVAL seconds, then exactly one terminal "
        "event: interrupted, error or finished."
    ),
    "message": "What happened; on a terminal event, what happens next.",
    "records_written": "Candles Kafka has acknowledged in this run.",
    "finished": (
        "true only on a terminal event whose outcome is final: nothing will start the work "
        "again. Always false on started and loading."
    ),
    "producer": "TELEMETRY_PRODUCER_ID; with SHARD_COUNT > 1, `<id>/shard-<i>-of-<n>`.",
    "timestamp": "When the event was made: seconds since the Unix epoch (UTC), with a fraction.",
}
_CONTROL_FIELDS: Final = {
    "command": (
        "stop ends every run of the queue with interrupted and finished true. The loader "
        "ignores any other command (and counts it in loader_control_ignored_total)."
    ),
    "queue_id": "QUEUE_ID of the runs to stop (every shard); other queues' commands are skipped.",
}


def _object(struct: type[msgspec.Struct], fields: dict[str, str]) -> Json:
    """The struct's schema as msgspec makes it, at the top level, each field described."""
    _, components = msgspec.json.schema_components([struct])
    made: Json = components[struct.__name__]
    properties: Json = made["properties"]
    if set(fields) != set(properties):
        raise ValueError(
            f"{struct.__name__}: fields without a description in loader/contracts: "
            f"{sorted(set(properties) - set(fields))}; described but not in the struct: "
            f"{sorted(set(fields) - set(properties))}: describe every field there"
        )
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        if isinstance(field.type, msgspec.inspect.RawType):
            # Raw is any JSON to msgspec; here it is always a number (binance.py checks).
            # `format: decimal` (an annotation, not checked) makes code generators such as
            # datamodel-code-generator type the field Decimal rather than float.
            properties[field.encode_name] = {
                "type": "number",
                "format": "decimal",
                "description": _DECIMAL,
            }
        properties[field.encode_name]["description"] = " ".join(
            filter(
                None, [fields[field.encode_name], properties[field.encode_name].get("description")]
            )
        )
    return {"$schema": _DRAFT, **made}


def candle_schema() -> Json:
    schema = _object(Candle, _CANDLE_FIELDS)
    schema["description"] += (
        " One JSON object per message, fields in this order, keyed "
        "`<symbol>-<interval>` (see $defs/key); with CANDLES=closed only closed candles, each "
        "once, in order per key."
    )
    # A pattern, not an enum: generated clients would name 1m and 1M alike in languages that
    # case-fold enum constants (Java's, for one).
    alternatives = "|".join(INTERVALS)
    schema["properties"]["interval"]["pattern"] = f"^({alternatives})$"
    schema["additionalProperties"] = False
    schema["$defs"] = {
        "key": {
            "title": "CandleKey",
            "description": (
                "The Kafka message key, UTF-8: the candle's symbol and interval joined by '-' "
                "(BTCUSDT-1m). Kafka's default partitioner (murmur2 of the key) keeps a stream "
                "on one partition, which the loader relies on to resume from the topic."
            ),
            "type": "string",
            "pattern": f"^.+-({alternatives})$",
        }
    }
    # msgspec.Raw keeps the digits when the schema is written (a float would drop the zeros).
    schema["examples"] = [
        {
            "open_time": 1767225600000,
            "open": msgspec.Raw(b"60685.22000000"),
            "high": msgspec.Raw(b"60712.00000000"),
            "low": msgspec.Raw(b"60680.01000000"),
            "close": msgspec.Raw(b"60700.10000000"),
            "volume": msgspec.Raw(b"12.34567000"),
            "close_time": 1767225659999,
            "quote_asset_volume": msgspec.Raw(b"749393.21834560"),
            "number_of_trades": 1834,
            "taker_buy_base_asset_volume": msgspec.Raw(b"6.10000000"),
            "taker_buy_quote_asset_volume": msgspec.Raw(b"370277.35100000"),
            "symbol": "BTCUSDT",
            "interval": "1m",
        }
    ]
    return schema


def telemetry_schema() -> Json:
    schema = _object(TelemetryEvent, _TELEMETRY_FIELDS)
    schema["description"] += (
        " One JSON object per message, fields in this order, keyed by QUEUE_ID (see $defs/key)."
    )
    schema["properties"]["records_written"]["minimum"] = 0
    schema["additionalProperties"] = False
    schema["if"] = {"properties": {"status": {"enum": _STATUS_NOT_TERMINAL}}}
    schema["then"] = {"properties": {"finished": {"const": False}}}
    schema["$defs"] = {
        "key": {
            "title": "TelemetryKey",
            "description": "The Kafka message key, UTF-8: QUEUE_ID, the event's queue_id.",
            "type": "string",
            "minLength": 1,
        }
    }
    return schema


def control_schema() -> Json:
    schema = _object(ControlCommand, _CONTROL_FIELDS)
    schema["description"] += (
        " A JSON object; the loader reads every partition of QUEUE_CONTROL_TOPIC from "
        "CONTROL_LOOKBACK seconds before it started, with no consumer group, so a stop sent "
        "before the pod started counts too."
    )
    schema["properties"]["command"]["enum"] = ["stop"]
    # The loader skips fields it does not know, so a newer queue manager may add some.
    schema["additionalProperties"] = True
    schema["$defs"] = {
        "key": {
            "title": "ControlKey",
            "description": (
                "Not read by the loader: any key or none. Keying by QUEUE_ID keeps one queue's "
                "commands in order."
            ),
        }
    }
    return schema


def _message(name: str, title: str, summary: str, file: str) -> Json:
    return {
        "name": name,
        "title": title,
        "summary": summary,
        "contentType": "application/json",
        "payload": {"$ref": f"{file}"},
        "bindings": {"kafka": {"key": {"$ref": f"{file}#/$defs/key"}, "bindingVersion": "0.5.0"}},
    }


def _producing(description: str) -> Json:
    return {
        "bindingVersion": "0.5.0",
        "x-acks": "all",
        "x-enable-idempotence": True,
        "x-description": description,
    }


def asyncapi() -> Json:
    """The loader's side of its three topics; the queue manager's operations are the
    reverse: it receives on the events channel and sends on the control channel."""
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "loader-ws-candles",
            "version": CONTRACT_VERSION,
            "description": (
                "Streams Binance klines into Kafka, one Kubernetes Job per workflow. This "
                "document is the loader's view: it sends candles and telemetry and receives "
                "control commands; the queue manager receives on `events` and sends on "
                "`control`, consumers of the data topic receive on `candles`. Payload and key "
                "schemas are the JSON Schema (2020-12) files next to this document."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "kafka": {
                "host": "localhost:9092",
                "protocol": "kafka",
                "description": (
                    "KAFKA_BOOTSTRAP_SERVERS. PLAINTEXT by default; SASL_SSL (SCRAM-SHA-512, "
                    "SCRAM-SHA-256 or PLAIN) when KAFKA_USER_PRODUCER is set; SSL when only "
                    "CA_PATH is."
                ),
            }
        },
        "channels": {
            "candles": {
                "address": "{KAFKA_TOPIC}",
                "title": "Candles",
                "description": (
                    "One message per closed candle (with CANDLES=all, per in-progress update "
                    "too), exactly once and in order per key through reconnects and restarts."
                ),
                "parameters": {"KAFKA_TOPIC": {"description": "The KAFKA_TOPIC setting."}},
                "messages": {"candle": {"$ref": "#/components/messages/candle"}},
            },
            "events": {
                "address": "{QUEUE_EVENTS_TOPIC}",
                "title": "Telemetry",
                "description": (
                    "The run's telemetry: started, loading every TELEMETRY_INTERVAL seconds, "
                    "then exactly one terminal event (interrupted, error or finished)."
                ),
                "parameters": {
                    "QUEUE_EVENTS_TOPIC": {
                        "description": "The QUEUE_EVENTS_TOPIC setting.",
                        "default": "queue-events",
                    }
                },
                "messages": {"telemetry": {"$ref": "#/components/messages/telemetry"}},
            },
            "control": {
                "address": "{QUEUE_CONTROL_TOPIC}",
                "title": "Control",
                "description": "Commands to the runs of a queue.",
                "parameters": {
                    "QUEUE_CONTROL_TOPIC": {
                        "description": "The QUEUE_CONTROL_TOPIC setting.",
                        "default": "queue-control",
                    }
                },
                "messages": {"control": {"$ref": "#/components/messages/control"}},
            },
        },
        "operations": {
            "sendCandles": {
                "action": "send",
                "channel": {"$ref": "#/channels/candles"},
                "messages": [{"$ref": "#/channels/candles/messages/candle"}],
                "summary": "The loader publishes candles.",
                "bindings": {
                    "kafka": _producing(
                        "acks=all, idempotent producer: a candle counts in records_written "
                        "once every in-sync replica has it."
                    )
                },
            },
            "sendTelemetry": {
                "action": "send",
                "channel": {"$ref": "#/channels/events"},
                "messages": [{"$ref": "#/channels/events/messages/telemetry"}],
                "summary": "The loader reports its state.",
                "bindings": {
                    "kafka": _producing(
                        "acks=all, idempotent producer; a loading event is sent every "
                        "TELEMETRY_INTERVAL whether or not the one before was acknowledged "
                        "(in order: one producer, one partition per key), and the terminal "
                        "event after every other. A terminal event the main producer surely "
                        "did not write goes through a producer of its own (acks=all, one "
                        "record), so it is sent at most once."
                    )
                },
            },
            "receiveControl": {
                "action": "receive",
                "channel": {"$ref": "#/channels/control"},
                "messages": [{"$ref": "#/channels/control/messages/control"}],
                "summary": "The loader obeys stop commands for its QUEUE_ID.",
                "bindings": {
                    "kafka": {
                        "bindingVersion": "0.5.0",
                        "x-description": (
                            "No consumer group (no groupId, nothing committed): every run "
                            "assigns itself all partitions and reads from CONTROL_LOOKBACK "
                            "seconds before it started."
                        ),
                    }
                },
            },
        },
        "components": {
            "messages": {
                "candle": _message("Candle", "Candle", "One Binance kline.", FILES["candle"]),
                "telemetry": _message(
                    "TelemetryEvent",
                    "Telemetry event",
                    "The run's state, for the queue manager.",
                    FILES["telemetry"],
                ),
                "control": _message(
                    "ControlCommand",
                    "Control command",
                    "A command to the runs of one queue.",
                    FILES["control"],
                ),
            }
        },
    }


_MAKERS: Final = {
    "candle": candle_schema,
    "telemetry": telemetry_schema,
    "control": control_schema,
    "asyncapi": asyncapi,
}


def render(name: str) -> bytes:
    """The file `name` as it is written: two-space indented JSON and a final newline."""
    return msgspec.json.format(msgspec.json.encode(_MAKERS[name]()), indent=2) + b"\n"


def committed(name: str) -> bytes:
    """The file `name` as shipped in the package."""
    return resources.files(__name__).joinpath(FILES[name]).read_bytes()


def write(folder: Path) -> list[str]:
    """Write every file into `folder`; returns the names of those that changed."""
    changed = []
    for name, file in FILES.items():
        path = folder / file
        made = render(name)
        if not path.exists() or path.read_bytes() != made:
            path.write_bytes(made)
            changed.append(name)
    return changed


def main(argv: list[str]) -> int:
    """`loader-ws-candles schema [NAME] [--write]`."""
    parser = argparse.ArgumentParser(
        prog="loader-ws-candles schema",
        description=(
            "Print the JSON Schema of a message or the AsyncAPI document of the three topics; "
            "without a name, list the files."
        ),
    )
    parser.add_argument("name", nargs="?", choices=list(FILES))
    parser.add_argument(
        "--write",
        action="store_true",
        help="make every file again from loader/schema.py, next to this module (a checkout)",
    )
    args = parser.parse_args(argv)
    if args.write:
        if args.name is not None:
            parser.error("--write makes every file; give no name")
        folder = Path(__file__).resolve().parent
        if not (folder.parents[1] / "pyproject.toml").is_file():
            parser.error(f"--write rewrites a checkout's loader/contracts, not {folder}")
        changed = write(folder)
        print(f"{folder}: {', '.join(changed) + ' rewritten' if changed else 'up to date'}")
        return 0
    if args.name is None:
        root = resources.files(__name__)
        for name, file in FILES.items():
            print(f"{name}\t{root.joinpath(file)}")
        return 0
    sys.stdout.buffer.write(committed(args.name))
    return 0
