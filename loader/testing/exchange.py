"""``exchangeInfo``: the market's symbols as Binance describes them (status, assets, filters).

Only what a market-data client reads is modelled: every symbol trades (``TRADING``), spot
only; ``PRICE_FILTER`` and ``LOT_SIZE`` come from the symbol's tick and lot in the
deterministic market. Order-related fields carry Binance's usual values so that a client's
model of the reply parses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from loader.testing.market import Market, format_units

__all__ = [
    "SYMBOL_STATUSES",
    "exchange_info",
    "global_rate_limits",
    "split_symbol",
    "symbols_with",
]

#: ``symbolStatus`` values Binance accepts.
SYMBOL_STATUSES = ("TRADING", "HALT", "BREAK")

# Longest first, so that "FDUSD" wins over "USD"-like shorter endings.
_QUOTES = (
    "FDUSD",
    "USDT",
    "USDC",
    "TUSD",
    "BUSD",
    "EUR",
    "TRY",
    "BRL",
    "JPY",
    "BTC",
    "ETH",
    "BNB",
)
_PERMISSIONS = ("SPOT",)
_ORDER_TYPES = ("LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT")
_STP_MODES = ("NONE", "EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH", "DECREMENT")
_MAX_PRICE = 1_000_000 * 100_000_000
_MAX_QTY = 9_000 * 100_000_000


def split_symbol(symbol: str) -> tuple[str, str]:
    """``"BTCUSDT"`` -> ``("BTC", "USDT")``; an unknown quote: the last four letters."""
    for quote in _QUOTES:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)], quote
    return symbol[:-4], symbol[-4:]


def global_rate_limits(weight_limit: int | None, max_attempts: int | None) -> list[dict[str, Any]]:
    """The ``rateLimits`` of ``exchangeInfo``: the limits in force, without counts."""
    limits: list[dict[str, Any]] = []
    if weight_limit is not None:
        limits.append(
            {
                "rateLimitType": "REQUEST_WEIGHT",
                "interval": "MINUTE",
                "intervalNum": 1,
                "limit": weight_limit,
            }
        )
    limits += [
        {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 50},
        {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 160_000},
    ]
    if max_attempts is not None:
        limits.append(
            {
                "rateLimitType": "CONNECTIONS",
                "interval": "MINUTE",
                "intervalNum": 5,
                "limit": max_attempts,
            }
        )
    return limits


def _symbol(market: Market, symbol: str, permission_sets: bool) -> dict[str, Any]:
    spec = market.spec(symbol)
    base, quote = split_symbol(symbol)
    return {
        "symbol": symbol,
        "status": "TRADING",
        "baseAsset": base,
        "baseAssetPrecision": 8,
        "quoteAsset": quote,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": list(_ORDER_TYPES),
        "icebergAllowed": True,
        "ocoAllowed": True,
        "otoAllowed": True,
        "opoAllowed": True,
        "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": True,
        "cancelReplaceAllowed": True,
        "amendAllowed": True,
        "pegInstructionsAllowed": True,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": False,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": format_units(spec.tick),
                "maxPrice": format_units(_MAX_PRICE),
                "tickSize": format_units(spec.tick),
            },
            {
                "filterType": "LOT_SIZE",
                "minQty": format_units(spec.lot),
                "maxQty": format_units(_MAX_QTY),
                "stepSize": format_units(spec.lot),
            },
        ],
        "permissions": [],
        "permissionSets": [list(_PERMISSIONS)] if permission_sets else [],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": list(_STP_MODES),
    }


def symbols_with(permissions: Iterable[str]) -> bool:
    """Whether this market's symbols (all alike) carry any of ``permissions``."""
    return any(p in _PERMISSIONS for p in permissions)


def exchange_info(
    market: Market,
    symbols: Iterable[str],
    *,
    server_time: int,
    permission_sets: bool,
    rate_limits: list[dict[str, Any]],
) -> dict[str, Any]:
    """The ``result`` of ``exchangeInfo`` for ``symbols`` (already validated), in order."""
    return {
        "timezone": "UTC",
        "serverTime": server_time,
        "rateLimits": rate_limits,
        "exchangeFilters": [],
        "symbols": [_symbol(market, s, permission_sets) for s in symbols],
    }
