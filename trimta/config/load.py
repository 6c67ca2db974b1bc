"""Load a TOML configuration file into a `Config`, or say what is wrong.

Loading runs in three passes, and each one reports every problem it finds,
not just the first:

1. TOML syntax (tomllib names the line and column).
2. Structure and types, by cattrs with one strict hook per value type and
   unknown keys forbidden. cattrs raises a tree of exception groups whose
   notes name the attribute or index at each level; `_walk_errors` turns
   that tree into key paths such as `listener[0].address`.
3. Rules that span several keys (a domain listed twice, backoffs in the
   wrong order), checked on the structured `Config`.

Every problem becomes one line: the key path, the value as written, and
what is expected.
"""

from __future__ import annotations

import importlib.resources
import json
import sys
import typing
from pathlib import Path
from typing import Any

import attrs
import cattrs
import cattrs.gen
from cattrs.errors import (
    AttributeValidationNote,
    ForbiddenExtraKeysError,
    IterableValidationNote,
)

from trimta.config import checks
from trimta.config.model import Config, Route
from trimta.config.values import (
    DomainName,
    Duration,
    ListenAddress,
    LocalPart,
    NameserverAddress,
    Network,
    NextHop,
    RouteKey,
    parse_duration,
    parse_host_port,
    parse_network,
)
from trimta.smtp.address import AddressError, normalize_domain

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


@attrs.frozen
class Problem:
    """One thing wrong in a configuration file.

    Attributes:
        path: Key path such as `listener[0].address`; empty for the file.
        value: The value as written, or None when the key is missing.
        expected: What the key needs, and how to write it.
    """

    path: str
    value: object
    expected: str

    def __str__(self) -> str:
        if not self.path:
            return self.expected
        if self.value is _MISSING:
            return f"{self.path}: {self.expected}"
        return f"{self.path} = {_show(self.value)}: {self.expected}"


@attrs.define(eq=False)
class ConfigError(Exception):
    """A configuration that cannot be used, with every problem found.

    Attributes:
        source: The file name, or "<default>" for the embedded default.
        problems: The problems, in file order where known.
    """

    source: str
    problems: list[Problem]

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def lines(self) -> list[str]:
        """Format one line per problem, each naming the file."""
        return [f"config {self.source}: {problem}" for problem in self.problems]


_MISSING = object()
DEFAULT_SOURCE = "<default>"


def default_text() -> str:
    """Return the embedded default configuration as TOML text."""
    resource = importlib.resources.files("trimta.config") / "default.toml"
    return resource.read_text(encoding="utf-8")


def load_default() -> Config:
    """Load the embedded default configuration."""
    return parse_text(default_text(), DEFAULT_SOURCE)


def load_file(path: Path) -> Config:
    """Read and check one configuration file.

    Raises:
        ConfigError: The file cannot be read or has problems.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = Problem("", _MISSING, f"cannot read the file: {exc}")
        raise ConfigError(str(path), [problem]) from exc
    return parse_text(text, str(path))


def parse_text(text: str, source: str) -> Config:
    """Parse TOML text into a checked `Config`.

    Raises:
        ConfigError: The text is not TOML or breaks a rule of the format.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problem = Problem("", _MISSING, f"invalid TOML: {exc}")
        raise ConfigError(source, [problem]) from exc
    problems = list(_shape_problems(raw, Config, []))
    if problems:
        raise ConfigError(source, problems)
    try:
        config = _CONVERTER.structure(raw, Config)
    except Exception as exc:  # cattrs raises exception groups of any kind
        problems = list(_walk_errors(exc, [], raw))
        if not problems:
            raise
        raise ConfigError(source, problems) from exc
    problems = [Problem(path, value, want) for path, value, want in checks.run(config)]
    if problems:
        raise ConfigError(source, problems)
    return config


def _shape_problems(value: object, model: object, path: list[object]):
    """Yield a Problem for each table or list written as another kind of value.

    cattrs would iterate a string where a list belongs (one item per
    character) and fail with a traceback on a table written as a scalar,
    so the shape of the raw TOML is checked against the model first.
    """
    origin = typing.get_origin(model)
    if model in (Route, Duration):
        return  # written as a scalar or list; its own hook says what it expects
    if isinstance(model, type) and attrs.has(model):
        if not isinstance(value, dict):
            keys = ", ".join(field.name for field in attrs.fields(model))
            yield Problem(_format_path(path), value, f"expected a table with the keys: {keys}")
            return
        hints = typing.get_type_hints(model)
        for name, item in value.items():
            if name in hints:
                yield from _shape_problems(item, hints[name], path + [name])
    elif origin in (tuple, list):
        item_model = typing.get_args(model)[0]
        if not isinstance(value, list):
            yield Problem(_format_path(path), value, _list_expected(item_model, path))
            return
        for index, item in enumerate(value):
            yield from _shape_problems(item, item_model, path + [_Index(index)])
    elif origin is dict:
        if not isinstance(value, dict):
            yield Problem(_format_path(path), value, "expected a table of key = value pairs")
            return
        item_model = typing.get_args(model)[1]
        for key, item in value.items():
            yield from _shape_problems(item, item_model, path + [_Index(key)])


def _list_expected(item_model: object, path: list[object]) -> str:
    if isinstance(item_model, type) and attrs.has(item_model):
        return f"expected one or more [[{_format_path(path)}]] tables"
    return 'expected a list in brackets, e.g. ["..."]'


def _walk_errors(exc: BaseException, path: list[object], raw: object):
    """Yield a Problem for each leaf error of a cattrs exception tree."""
    for sub in getattr(exc, "exceptions", None) or ():
        yield from _walk_errors(sub, path + _note_segments(sub), raw)
    if isinstance(exc, ForbiddenExtraKeysError):
        known = ", ".join(field.name for field in attrs.fields(exc.cl))
        for key in sorted(exc.extra_fields):
            yield Problem(
                _format_path(path + [key]),
                _MISSING,
                f"unknown key; the keys here are: {known}",
            )
    elif isinstance(exc, KeyError) and not hasattr(exc, "exceptions"):
        yield Problem(_format_path(path), _MISSING, "missing; this key is required")
    elif isinstance(exc, (ValueError, TypeError)) and not hasattr(exc, "exceptions"):
        yield Problem(_format_path(path), _lookup(raw, path), str(exc))


def _note_segments(exc: BaseException) -> list[object]:
    segments: list[object] = []
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, AttributeValidationNote):
            segments.append(note.name)
        elif isinstance(note, IterableValidationNote):
            segments.append(_Index(note.index))
    return segments


@attrs.frozen
class _Index:
    """A list index or mapping key in a key path."""

    key: object


def _format_path(segments: list[object]) -> str:
    text = ""
    for segment in segments:
        if isinstance(segment, _Index) and isinstance(segment.key, int):
            text += f"[{segment.key}]"
            continue
        name = segment.key if isinstance(segment, _Index) else segment
        name = str(name)
        if not name.replace("_", "").replace("-", "").isalnum():
            name = f'"{name}"'
        text += f".{name}" if text else name
    return text


def _lookup(raw: object, segments: list[object]) -> object:
    value = raw
    for segment in segments:
        key = segment.key if isinstance(segment, _Index) else segment
        try:
            value = value[key]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return value


def _show(value: object) -> str:
    if isinstance(value, str):
        shown = value if len(value) <= 80 else value[:77] + "..."
        # JSON string syntax escapes quotes and control characters, so a
        # value never breaks the one-line message.
        return json.dumps(shown, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _strict(kind: type, what: str):
    def structure(value: Any, _type: object) -> Any:
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise ValueError(f"expected {what}")
        return value

    return structure


def _structure_domain(value: Any, _type: object) -> str:
    if not isinstance(value, str):
        raise ValueError('expected a domain name string, e.g. "example.org"')
    try:
        return normalize_domain(value)
    except AddressError as exc:
        raise ValueError(f'expected a domain name such as "example.org": {exc}') from None


def _structure_path(value: Any, _type: object) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError('expected a folder path string, e.g. "/var/spool/trimta"')
    return Path(value).expanduser()


def _structure_optional_path(value: Any, _type: object) -> Path | None:
    """Structure an optional file path, where "" means none."""
    if value == "" or value is None:
        return None
    if not isinstance(value, str):
        raise ValueError('expected a file path string, e.g. "/etc/trimta/file.pem"')
    return Path(value).expanduser()


def _structure_local_part(value: Any, _type: object) -> str:
    if not isinstance(value, str) or not value or "@" in value:
        raise ValueError('expected a local part without "@", e.g. "alice"')
    return value.lower()


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(str, _strict(str, "a string"))
    converter.register_structure_hook(int, _strict(int, "a whole number"))
    converter.register_structure_hook(bool, _strict(bool, "true or false"))
    converter.register_structure_hook(Path, _structure_path)
    converter.register_structure_hook_func(
        lambda model: model == (Path | None), _structure_optional_path
    )
    converter.register_structure_hook(DomainName, _structure_domain)
    converter.register_structure_hook(Duration, lambda v, _: parse_duration(v))
    converter.register_structure_hook(Network, lambda v, _: parse_network(v))
    converter.register_structure_hook(
        ListenAddress, lambda v, _: parse_host_port(v, ip_only=True)
    )
    converter.register_structure_hook(
        NextHop, lambda v, _: parse_host_port(v, default_port=25)
    )
    converter.register_structure_hook(
        NameserverAddress, lambda v, _: parse_host_port(v, default_port=53)
    )
    converter.register_structure_hook(LocalPart, _structure_local_part)
    converter.register_structure_hook(RouteKey, _structure_route_key)
    route_table = cattrs.gen.make_dict_structure_fn(
        Route, converter, _cattrs_forbid_extra_keys=True
    )

    def structure_route(value: Any, _type: object) -> Route:
        if isinstance(value, list):
            hosts = converter.structure(value, tuple[NextHop, ...])
            return Route(hosts=hosts)
        if isinstance(value, dict):
            return route_table(value, Route)
        raise ValueError(
            'expected a list of "host:port" next hops, or a table with hosts = [...]'
        )

    converter.register_structure_hook(Route, structure_route)
    return converter


def _structure_route_key(value: Any, _type: object) -> str:
    if value == "*":
        return value
    return _structure_domain(value, _type)


_CONVERTER = _make_converter()
