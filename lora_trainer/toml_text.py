"""TOML text for the files this project writes (job configs, Kohya exports, presets, sd-scripts' configs).

``toml.dumps`` (0.10.2, the version the WebUI's venv has) leaves ``\\x`` unescaped in strings, so any Windows path
with a part starting with x (``D:\\models\\xxmix.safetensors``) is written as an invalid escape that no TOML reader,
sd-scripts' included, will load. Strings are written here as JSON strings, which are valid TOML basic strings."""

from __future__ import annotations

import json
from typing import Any, Mapping

import toml

from .errors import UserError


def _basic_string(text: str) -> str:
    # JSON leaves DEL as it is, which TOML forbids unescaped; a lone surrogate (a file name that is not UTF-8) has no
    # TOML escape, so it goes as the character U+FFFD the reader would show for it anyway
    text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


class _Encoder(toml.TomlEncoder):
    def __init__(self):
        super().__init__()
        self.dump_funcs[str] = _basic_string


def dumps(data: Mapping[str, Any]) -> str:
    return toml.dumps(data, encoder=_Encoder())


def loads(text: str, what: str, advice: str = "") -> dict[str, Any]:
    """``text`` read as TOML; a mistake is a UserError naming ``what`` ("Config file D:\\run.toml"), where and — for the
    usual one, a Windows path written in double quotes — the fix (else ``advice``, if any)."""
    try:
        return toml.loads(text)
    except toml.TomlDecodeError as error:
        hint = ("; a Windows path in double quotes needs each backslash doubled: write it in single quotes "
                "('D:\\data\\10_name') or with forward slashes"
                if "escape" in error.msg.lower() or "unbalanced quotes" in error.msg.lower() else advice)
        raise UserError(f"{what} is not valid TOML: {error.msg} (line {error.lineno}, column {error.colno}){hint}.") from None
