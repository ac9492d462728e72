"""Lua scripts: loaded once from the package, called through one typed wrapper each.

Each script is `lib.lua` followed by the script's own file, so shared transitions (placing,
finishing, leasing a job) exist once. Scripts are called with EVALSHA; when the server does not
know a script (restart, SCRIPT FLUSH, a new cluster node) it is loaded and the call repeated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

__all__ = ["SCRIPT_NAMES", "Script", "Scripts", "load_source"]

SCRIPT_NAMES = tuple(
    sorted(
        entry.name.removesuffix(".lua")
        for entry in (resources.files("queue_core") / "lua").iterdir()
        if entry.name.endswith(".lua") and entry.name != "lib.lua"
    )
)


@cache
def load_source(name: str) -> str:
    lua = resources.files("queue_core") / "lua"
    lib = (lua / "lib.lua").read_text()
    body = (lua / f"{name}.lua").read_text()
    return f"{lib}\n-- ==== {name}.lua ====\n{body}"


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> Script:
        source = load_source(name)
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())

    async def __call__(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


class Scripts:
    """All scripts, by name. Cheap to build: sources are read once per process."""

    def __init__(self) -> None:
        self._by_name = {name: Script.load(name) for name in SCRIPT_NAMES}

    def __getitem__(self, name: str) -> Script:
        return self._by_name[name]

    async def load_all(self, client: Any) -> None:
        for script in self._by_name.values():
            await client.script_load(script.source)


@cache
def scripts() -> Scripts:
    return Scripts()
