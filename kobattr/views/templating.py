"""Text helpers of the HTML pages (kobattr.views and plots.html_report): JSON that is safe inside <script>, and
one-pass template filling. Kept apart from plots so that the views do not import matplotlib."""

from __future__ import annotations

import re
from typing import Mapping


def embeddable_json(text: str) -> str:
    """JSON that cannot end its <script> element early: <, > and & become \\u escapes (still valid JSON)."""
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """The template with each {{NAME}} slot replaced by values[NAME], in one pass over the template only:
    the values are never searched for slots, so a title or token that contains "{{DATA}}" stays text."""
    parts = re.split(r"\{\{([A-Z]+)\}\}", template)
    # re.split with a group alternates literal text (even indices) and slot names (odd indices)
    return "".join(part if i % 2 == 0 else values[part] for i, part in enumerate(parts))
