"""The browser chat page: static files shipped as package data, served by ``api/page.py``.

Plain HTML, CSS and ES modules (``app.js``, ``markdown.js``), so the page needs
no build step and no network beyond this server: no CDN, no external font.
"""

from __future__ import annotations

from pathlib import Path

PAGE_DIR = Path(__file__).resolve().parent
INDEX = PAGE_DIR / "index.html"
