"""
Key normalisation: the one place that decides what a lookup key means.

Postfix, mail clients and users hand us addresses in many spellings.  Every
address-keyed decision (lookups, quotas, logins) goes through
L{normalise_address} so that one mailbox has one identity, and so that keys
that cannot be a Userli address never reach the API.
"""

from __future__ import annotations

import re
import unicodedata

# Both patterns are used with fullmatch: a pattern ending in ``$`` also
# matches before a final line break, which let ``alice\n@x`` through.
_LOCAL_PART = re.compile(r"[a-z0-9._-]+")
# A domain label: letters (any script, as Postfix may pass SMTPUTF8 domains
# through), digits and inner hyphens.  Nothing that is URL or path syntax.
_LABEL = r"[^\W_](?:[^\W_]|-)*(?<!-)"
# Dot-separated labels, in one match.
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MAX_ADDRESS = 320
_MAX_DOMAIN = 253


def _is_invisible(char: str) -> bool:
    """Whitespace, control and format characters (zero-width space, BOM, ...)."""
    return char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Zs", "Zl", "Zp")


def _visible(text: str) -> bool:
    """
    Whether C{text} holds no whitespace, control, format, surrogate or
    private-use character anywhere.

    Such a character inside a key is not trimmed (it would glue two
    different spellings together) and cannot be part of a Userli address:
    a line break, NUL or zero-width space inside a key means the key is
    garbage or an attack, so it must reach neither the API nor a log line.
    C{str.isprintable} is false for every character of Unicode's "Other"
    and "Separator" categories except the ASCII space, checked apart.
    """
    return text.isprintable() and " " not in text


def _trim(text: str) -> str:
    if text and text[0].isalnum() and text[-1].isalnum():
        # The usual key: letters and digits are never invisible.
        return text
    start, end = 0, len(text)
    while start < end and _is_invisible(text[start]):
        start += 1
    while end > start and _is_invisible(text[end - 1]):
        end -= 1
    return text[start:end]


def normalise_domain(raw: str) -> str | None:
    """
    Lower-case and trim a domain name; C{None} when it cannot be one.

    The Go program sends domain keys to the API unchecked; we refuse
    anything that is not a plausible host name, which also keeps ``..``,
    ``/``, ``?``, ``#`` and ``%`` out of the URL path.
    """
    domain = _trim(raw).lower()
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain or len(domain) > _MAX_DOMAIN or not _visible(domain):
        return None
    if not _DOMAIN.fullmatch(domain):
        return None
    return domain


def normalise_address(raw: str, delimiter: str = "") -> str | None:
    """
    Normalise an address key the way compatibility.md says; C{None} when the
    key cannot be a Userli address.

    Lower-case; trim whitespace and invisible characters; exactly one ``@``;
    the local part cut at the first recipient delimiter character (Postfix
    treats every character of C{recipient_delimiter} as a delimiter); the
    local part non-empty and made of ``a-z 0-9 . _ -`` only; the domain a
    plausible host name.  A whitespace, control or format character inside
    the key (after the trim) refuses it, also behind a delimiter, where the
    cut would otherwise drop it unseen.
    """
    address = _trim(raw).lower()
    if len(address) > _MAX_ADDRESS or address.count("@") != 1 or not _visible(address):
        return None
    local, _, domain_part = address.partition("@")
    if delimiter:
        for index, char in enumerate(local):
            if char in delimiter:
                local = local[:index]
                break
    if not _LOCAL_PART.fullmatch(local):
        return None
    domain = normalise_domain(domain_part)
    if domain is None or domain != domain_part.removesuffix("."):
        return None
    return f"{local}@{domain}"
