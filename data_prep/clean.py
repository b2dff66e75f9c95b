"""Text cleaning applied to every input value before templating.

HTML tags and entities (IMDB reviews carry ``<br />``), Unicode normalisation and whitespace.
"""

from __future__ import annotations

import html
import re
import unicodedata

_BREAK = re.compile(r"<\s*(br|/p|p|/div|li)\b[^>]*>", re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(\s[^<>]*)?/?>")
_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200b\u3000]+")
_NEWLINES = re.compile(r"\s*\n\s*(\n\s*)+")
_LINE_BREAKS = {ord(c): "\n" for c in "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text: str, unicode_form: str | None = "NFC") -> str:
    """Strip HTML, decode entities, normalise Unicode and whitespace; keep paragraph breaks."""
    if "<" in text:
        text = _BREAK.sub("\n", text)
        text = _TAG.sub("", text)
    if "&" in text:
        text = html.unescape(text)
    if unicode_form:
        text = unicodedata.normalize(unicode_form, text)
    text = text.replace("\r\n", "\n").translate(_LINE_BREAKS)
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _NEWLINES.sub("\n\n", text)
    text = "\n".join(line.strip() for line in text.split("\n")) if "\n" in text else text
    return text.strip()
