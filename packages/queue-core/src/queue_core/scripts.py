"""Lua scripts: loaded once from the package, called through one typed wrapper each.

Each script is the parts of `lib.lua` it uses followed by the script's own file, so shared
transitions (placing, finishing, leasing a job) exist once. Only the parts a script reaches
(transitively) are prepended: Redis runs a script's whole chunk on every call, and defining
all of lib's ~60 functions cost ~27 µs per call on this VM, a quarter of a single add's time in
Redis. Scripts are called with EVALSHA; when the server does not know a script (restart,
SCRIPT FLUSH, a new cluster node) it is loaded and the call repeated.
"""

from __future__ import annotations

import hashlib
import re
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


_CHUNK_START = re.compile(r"^(local\s|[A-Za-z_]\w*\s*=\s*function\b)")
_IDENT = re.compile(r"[A-Za-z_]\w*")
_COMMENT = re.compile(r"--.*$", re.M)


@dataclass(frozen=True, slots=True)
class _Chunk:
    text: str
    defines: frozenset[str]
    uses: frozenset[str]


def _defined(statement: str) -> set[str]:
    first = _COMMENT.sub("", statement).strip()
    if first.startswith("local function "):
        return {first[len("local function ") :].split("(", 1)[0].strip()}
    if first.startswith("local "):
        head = first[len("local ") :].split("=", 1)[0]
        return {n.strip() for n in head.split(",") if n.strip()}
    return {first.split("=", 1)[0].strip()}


@cache
def _lib_chunks() -> tuple[_Chunk, ...]:
    """lib.lua split into its top-level statements: each runs from a line that starts one
    (`local ...`, `name = function`) to the next (comments in between travel along)."""
    text = (resources.files("queue_core") / "lua" / "lib.lua").read_text()
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _CHUNK_START.match(line)]
    chunks = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(lines)
        body = "\n".join(lines[start:end])
        uses = frozenset(_IDENT.findall(_COMMENT.sub("", body)))
        chunks.append(_Chunk(body, frozenset(_defined(lines[start])), uses))
    return tuple(chunks)


@cache
def load_source(name: str) -> str:
    body = (resources.files("queue_core") / "lua" / f"{name}.lua").read_text()
    chunks = _lib_chunks()
    needed = set(_IDENT.findall(_COMMENT.sub("", body)))
    while True:  # the transitive closure of what the body uses
        grown = set(needed)
        for chunk in chunks:
            if chunk.defines & needed:
                grown |= chunk.uses
        if grown == needed:
            break
        needed = grown
    lib = "\n".join(chunk.text for chunk in chunks if chunk.defines & needed)
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
