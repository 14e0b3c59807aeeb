"""`lrfluct show RUN_DIR`: one self-contained HTML page of a run directory.

Modules: command (arguments, errors, writing the page), content (what the page shows, taken
from lf.load_run), lines (line charts as inline SVG), maps (neurons x step maps as PNG data
URIs), page (the HTML). The page needs no server and no network: no JavaScript, inline CSS,
every figure inside the file.
"""
