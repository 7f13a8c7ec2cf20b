"""Property: whatever table or file a user hands over, the configuration is a Config or one
ConfigError, never another exception (OverflowError, ValueError, RecursionError...)."""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import fields
from typing import Any, get_type_hints

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bin_controller.bins import BINS
from bin_controller.config import Config, ConfigError, config_from_dict, load_config

SECTIONS: dict[str, list[Any]] = {
    section.name: list(fields(get_type_hints(Config)[section.name]))
    for section in fields(Config)}

# Integers from small to absurd: past 64 bits, past float range, past the 4,300 digits
# that Python prints.
huge_ints = st.builds(lambda sign, exp, n: sign * (10**exp + n), st.sampled_from([1, -1]),
                      st.sampled_from([18, 19, 20, 308, 309, 400, 4301, 5000]),
                      st.integers(0, 10))
ints = st.one_of(st.integers(), st.integers(-(2**64), 2**64), huge_ints)
floats = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0]))
texts = st.one_of(st.text(max_size=12), st.sampled_from(
    ["", "\0", "a/b", "+", "#", " ", "mqtt://x", "x" * 300, "/x" * 2100, "\udcff", *BINS,
     "beam", "ultrasonic", "mock", "simulated", "picamera2", "low", "full", "demo"]))
datetimes = st.one_of(st.datetimes(), st.dates(), st.times())
scalars = st.one_of(ints, floats, texts, st.booleans(), datetimes)
any_value = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)


def _plausible(f: Any) -> st.SearchStrategy[Any]:
    """A value of the key's own kind, mostly near its range, so that generated tables get
    past the type checks and reach the cross-checks."""
    meta = f.metadata
    if meta.get("choices"):
        return st.sampled_from(meta["choices"])
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        whole = [st.integers(math.ceil(lo), math.floor(hi))] if math.ceil(lo) <= hi else []
        return st.one_of(st.floats(lo, hi), *whole)
    if f.name == "angles":
        return st.dictionaries(st.sampled_from([*BINS, "glass"]),
                               st.one_of(st.floats(-200, 200), floats), max_size=5)
    return st.one_of(st.booleans(), texts)


def _mostly(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any],
            one_in: int = 5) -> st.SearchStrategy[Any]:
    """`odd` once in `one_in` draws, else `usual`: few odd values and keys per table, so
    that most tables get past the first check to the later ones."""
    return st.tuples(st.integers(1, one_in), usual, odd).map(
        lambda t: t[2] if t[0] == 1 else t[1])


def _with_junk(table: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    junk = st.dictionaries(st.text(max_size=6), any_value, min_size=1, max_size=2)
    return _mostly(table, st.tuples(table, junk).map(lambda t: {**t[0], **t[1]}), one_in=12)


def _section(name: str) -> st.SearchStrategy[dict[str, Any]]:
    key_values = st.one_of(*[st.tuples(st.just(f.name), _mostly(_plausible(f), any_value))
                             for f in SECTIONS[name]])
    return _with_junk(st.lists(key_values, max_size=6).map(dict))


tables = _with_junk(st.lists(
    st.one_of(*[st.tuples(st.just(name), _mostly(_section(name), any_value))
                for name in SECTIONS]),
    max_size=6).map(dict))


def _config_or_config_error(make: Any) -> None:
    try:
        cfg = make()
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message
        return
    assert isinstance(cfg, Config)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables)
def test_any_table_gives_a_config_or_a_config_error(table):
    _config_or_config_error(lambda: config_from_dict(table))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables, tables)
def test_overrides_are_checked_like_the_file(table, overrides):
    _config_or_config_error(lambda: config_from_dict(table, overrides))


# ------------------------------------------------------------------ TOML text


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v) if abs(v) < 10**4000 else "9" * 5000  # str() itself has a limit
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON escapes are TOML basic-string escapes
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


def _toml(table: dict[str, Any]) -> str:
    return "\n".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items()) + "\n"



@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables)
def test_any_toml_file_gives_a_config_or_a_config_error(tmp_path_factory, table):
    path = tmp_path_factory.mktemp("toml") / "c.toml"
    try:
        text = _toml(table)
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: not writable as UTF-8, nor as TOML
        return
    path.write_bytes(raw)
    _config_or_config_error(lambda: load_config(path))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"[sensor]\n", b"pin = ", b"9" * 5000, b"nan", b"inf", b"[",
                              b"]", b"{a=", b"}", b"\n", b"'", b'"\\u0000"', b"\xff", b"=",
                              b"flap.angles.other = ", b"1e400", b"0x7fffffffffffffff",
                              b"[bin]\nid = ", b"1979-02-30"]), max_size=30).map(b"".join)))
def test_any_bytes_in_a_file_give_a_config_or_a_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "c.toml"
    path.write_bytes(data)
    _config_or_config_error(lambda: load_config(path))
