"""The settings tables of docs/configuration.md, written from the table (relay/settings/table.py).

Each group's table sits between two markers in that file; the prose around them is written by
hand. `python -m relay.settings.docs` rewrites the tables in place (and says whether anything
changed); a test fails while the file differs from what this module writes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Final

from relay.settings.spec import GROUPS, SettingSpec
from relay.settings.table import SPECS

DOCUMENT: Final[Path] = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
_BLOCK: Final[re.Pattern[str]] = re.compile(
    r"(<!-- settings: (?P<group>[a-z]+), written by `python -m relay.settings.docs` -->\n)"
    r".*?"
    r"(<!-- end of settings: (?P=group) -->)",
    re.DOTALL,
)


def default_shown(spec: SettingSpec) -> str:
    """The Default column: the value as an operator would write it."""
    if spec.shown is not None:
        shown = spec.shown
    elif spec.default is None or spec.default == ():
        shown = "none"
    elif isinstance(spec.default, float):
        shown = f"`{spec.default:g}`"
    else:
        shown = f"`{spec.default}`"
    return f"{shown} (secret)" if spec.secret else shown


def table(group: str) -> str:
    rows = [
        f"| `{spec.env}` | {default_shown(spec)} | {spec.doc} |"
        for spec in SPECS
        if spec.group == group
    ]
    return "\n".join(["| Variable | Default | Meaning |", "|---|---|---|", *rows]) + "\n"


def render(document: str) -> str:
    """`document` with each group's table written afresh; every group must have its markers."""
    found = [match["group"] for match in _BLOCK.finditer(document)]
    if sorted(found) != sorted(GROUPS):
        raise ValueError(
            f"docs/configuration.md must hold one marked table per group {GROUPS}, has {found}"
        )
    return _BLOCK.sub(lambda match: match[1] + table(match["group"]) + match[3], document)


def main() -> int:
    before = DOCUMENT.read_text()
    after = render(before)
    if after == before:
        print(f"{DOCUMENT}: up to date")
        return 0
    DOCUMENT.write_text(after)
    print(f"{DOCUMENT}: settings tables rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
