"""Strict config from YAML text: errors read `file: a.b.c: problem`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads on/off/yes/no as booleans,
    which turned `--reasoning: off` in server_args into false, a dropped flag; here it
    stays the string "off" (typed fields such as flash_attn still accept on/off)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))


class ConfigError(Exception):
    """A config that cannot be used; the message names the file, key path and problem."""


def load_config(text: str, model: type[ConfigT], *, source: str = "<config>") -> ConfigT:
    try:
        data = yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader: no object tags
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, not {type(data).__name__}")
    data = expand_env(data, source)
    try:
        return model.model_validate(data, context={"source": source})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(data: Any, source: str, where: str = "") -> Any:
    """`${NAME}` and `${NAME:-default}` in string values, from the environment.

    So one file serves several hosts or ports (`listen_port: ${AGENT_PORT:-8081}`), and a
    Kubernetes pod can name its own IP. Keys and comments are left alone; a value with no
    `${` is returned as it is.
    """
    if isinstance(data, dict):
        return {k: expand_env(v, source, f"{where}.{k}" if where else str(k))
                for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, source, f"{where}.{i}") for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def value(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is None:
            if default is None:
                raise ConfigError(f"{source}: {where}: ${{{name}}} is not set in the "
                                  f"environment (give a default: ${{{name}:-value}})")
            return default
        return found
    return _ENV_REF.sub(value, data)


def load_config_file(path: str | Path, model: type[ConfigT]) -> ConfigT:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from exc
    return load_config(text, model, source=str(p))


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        msg = msg.removeprefix("Value error, ")
        # Whole-config checks name their own key path at the start of the message.
        lines.append(f"{source}: {where}: {msg}" if where else f"{source}: {msg}")
    return "\n".join(lines)
