"""The LSP explorer's page: one self-contained HTML file, its CSS, JS and data inline (no network).

The template (atoms_page.html, next to this module) renders the data client-side, a page of atom
cards at a time, so a K=3000 dictionary opens at once.
"""

from __future__ import annotations

import html
from pathlib import Path

TEMPLATE = Path(__file__).with_name("atoms_page.html")
DATA_MARK = "/*__ATOMS_DATA__*/"
TITLE_MARK = "__ATOMS_TITLE__"


def render_page(data_json: str, title: str) -> str:
    """The page with `data_json` (the JSON twin's text) inlined in a script element.

    Every '<' is written as the JSON escape \\u003c: contexts are corpus text, and a '</script>' or
    '<!--' in one must not end or confuse the script element (JSON.parse reads the escape back).
    """
    template = TEMPLATE.read_text(encoding="utf-8")
    return template.replace(TITLE_MARK, html.escape(title)).replace(DATA_MARK, data_json.replace("<", "\\u003c"))
