"""Views of kobattr results in a browser or a notebook: one self-contained HTML fragment or page per view, no
network, exact values in the page.

    result.show("head", layer=-1)            # in Jupyter (Attribution.show / save_html / _repr_html_ call these)
    kobattr.views.save_html(result, "head.html", view="head")

Views consume results only (kobattr.result), never kernels. See render() for the options.
"""

from .data import ALL_ENTRIES_UP_TO, DEFAULT_TOP_K, MAX_AUTO_DATA_BYTES, PARTS, VIEWS
from .html import page, render, save_html, show, summary_html, write_folder

__all__ = ["render", "page", "save_html", "show", "summary_html", "write_folder", "VIEWS", "PARTS",
           "DEFAULT_TOP_K", "ALL_ENTRIES_UP_TO", "MAX_AUTO_DATA_BYTES"]
