"""The paper's configs, shipped inside the package (cot2align/configs/), so they exist wherever cot2align is
installed — not only in a clone of the repository.

    names()              every shipped config, by name: "tiny", "cache_mistral_dolly", "distill/tinyllama_mistral_dskd"
    find(NAME)           the shipped config NAME names ("tiny", "tiny.yaml", "configs/tiny.yaml" alike), or None
    copy(NAME, DEST)     a copy to edit (DEST a file, or a directory to put it in); never over an existing file

`--config PATH` reads a file at PATH when there is one, else the shipped config PATH names: so the README's
`--config configs/tiny.yaml` works from any directory, and an edited copy at that path wins.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from cot2align.errors import ConfigError

SUFFIX = ".yaml"


def _root() -> Traversable:
    return resources.files("cot2align").joinpath("configs")


def _walk(folder: Traversable, prefix: str = ""):
    for item in sorted(folder.iterdir(), key=lambda i: i.name):
        if item.is_dir():
            yield from _walk(item, f"{prefix}{item.name}/")
        elif item.name.endswith(SUFFIX):
            yield f"{prefix}{item.name[:-len(SUFFIX)]}", item


def names() -> list[str]:
    return [name for name, _ in _walk(_root())]


def _name_of(text: str) -> str:
    """A shipped config's name from how it may be written: with or without the `configs/` folder and `.yaml`."""
    name = str(text).replace("\\", "/").strip().lstrip("./")
    name = name[len("configs/"):] if name.startswith("configs/") else name
    return name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name


def find(text: str) -> Traversable | None:
    return dict(_walk(_root())).get(_name_of(text))


def read(text: str) -> str:
    """The text of the shipped config `text` names, or a one-line error listing the names."""
    found = find(text)
    if found is None:
        raise ConfigError(f"{text}: no such shipped config (shipped: {', '.join(names())}; `cot2align configs` lists "
                          "them)")
    return found.read_text(encoding="utf-8")


def first_line(text: str) -> str:
    """What a config is for: its first comment line."""
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def copy(text: str, dest: str | Path) -> Path:
    """Write the shipped config `text` to `dest` (a directory: under its own file name) to edit; an existing file
    is never replaced."""
    content = read(text)
    target = Path(dest)
    if target.is_dir():
        target = target / f"{_name_of(text).rsplit('/', 1)[-1]}{SUFFIX}"
    if target.exists():
        raise ConfigError(f"{target}: exists; choose another destination (a copy never replaces a file)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content, encoding="utf-8")
    return target
