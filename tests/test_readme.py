"""Every Python block of README.md runs as written, on the embedded SQLite default, in a
fresh directory; a block marked ``<!-- fragment: why -->`` is a sketch of user code and
is only compiled."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(<!-- fragment: (?P<why>[^>]*) -->\n)?```python\n(?P<code>.*?)```",
                    re.DOTALL)


def blocks() -> list[tuple[int, str, str | None]]:
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m["code"], m["why"])
            for m in _BLOCK.finditer(text)]


def test_the_readme_has_runnable_blocks() -> None:
    """At least the quick start and the events example run (not everything is a sketch)."""
    assert sum(why is None for _, _, why in blocks()) >= 2


@pytest.mark.parametrize(("line", "code", "why"), blocks(), ids=lambda v: str(v)[:20])
def test_readme_block(line: int, code: str, why: str | None, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The block at this line of README.md runs as written (or compiles, for a sketch)."""
    compiled = compile(code, f"README.md:{line}", "exec")
    if why is not None:
        return
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"readme_{line}"}
    exec(compiled, namespace)  # our own README, as written
    assert os.getcwd() == str(tmp_path)
    if "apply_payment" in namespace:  # the quick start: its two deliveries made one row
        import sqlalchemy as sa

        store, ledger = namespace["store"], namespace["ledger"]
        with store.engine.connect() as conn:  # type: ignore[attr-defined]
            assert conn.execute(sa.select(sa.func.count()).select_from(ledger)).scalar() == 1
