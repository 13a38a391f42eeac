"""
Tests for L{userli_postfix.addresses}: the normalisation table of
compatibility.md.  One mailbox must have one spelling, and a key that
cannot be a Userli address must never reach the API.
"""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.addresses import normalise_address, normalise_domain


class NormaliseAddressTests(SynchronousTestCase):
    """L{normalise_address} without a recipient delimiter."""

    def assertTable(self, table: list[tuple[str, str | None]], delimiter: str = "") -> None:
        for raw, expected in table:
            self.assertEqual(
                normalise_address(raw, delimiter), expected, f"{raw!r} (delimiter {delimiter!r})"
            )

    def test_case(self) -> None:
        """Local part and domain are lower-cased: C{User@X} and C{user@x} are one mailbox."""
        self.assertTable(
            [
                ("User@Example.ORG", "user@example.org"),
                ("USER@EXAMPLE.ORG", "user@example.org"),
                ("user@example.org", "user@example.org"),
            ]
        )

    def test_whitespace(self) -> None:
        """Leading and trailing whitespace of any kind is trimmed."""
        self.assertTable(
            [
                ("  user@example.org", "user@example.org"),
                ("user@example.org  ", "user@example.org"),
                ("\tuser@example.org\r\n", "user@example.org"),
                ("\u00a0user@example.org\u3000", "user@example.org"),
                ("\u2028user@example.org\u2029", "user@example.org"),
            ]
        )

    def test_invisible_characters(self) -> None:
        """Zero-width spaces, the BOM and control characters around the key are trimmed."""
        self.assertTable(
            [
                ("\u200buser@example.org", "user@example.org"),
                ("user@example.org\u200b", "user@example.org"),
                ("\ufeffuser@example.org", "user@example.org"),
                ("\u200d\u2060user@example.org\u200c", "user@example.org"),
                ("user@example.org\x00", "user@example.org"),
                ("\x01\x7fuser@example.org", "user@example.org"),
                ("\ufeff \u200b user@example.org \x00", "user@example.org"),
            ]
        )

    def test_inner_invisible_characters(self) -> None:
        """
        An invisible character inside the key is not trimmed (it would glue two
        different spellings together): the key is refused.
        """
        self.assertTable(
            [
                ("us\u200ber@example.org", None),
                ("user\x00@example.org", None),
                ("user@exam\u200bple.org", None),
                ("user\r\n@example.org", None),
                ("user @example.org", None),
                ("user@ example.org", None),
                ("user@exa mple.org", None),
            ]
        )

    def test_line_breaks_inside(self) -> None:
        """
        A line break inside the key refuses it, wherever it is: a pattern
        ending in C{$} also matches before a final line break, which let
        C{alice\\n@example.org} through to the API as C{alice%0A@example.org}.
        """
        self.assertTable(
            [
                ("alice\n@example.org", None),
                ("alice\r@example.org", None),
                ("alice@example\n.org", None),
                ("alice@example.org\n.net", None),
                ("alice@exa\x0bmple.org", None),
                ("al\x85ice@example.org", None),
                ("alice\u2028@example.org", None),
            ]
        )

    def test_exactly_one_at(self) -> None:
        """A key with no C{@} or several is no address."""
        self.assertTable(
            [
                ("user", None),
                ("user.example.org", None),
                ("a@b@example.org", None),
                ("user@@example.org", None),
                ("@", None),
                ("", None),
                ("   ", None),
            ]
        )

    def test_empty_parts(self) -> None:
        """The local part and the domain must both be non-empty."""
        self.assertTable(
            [
                ("@example.org", None),
                ("user@", None),
                ("user@.", None),
            ]
        )

    def test_local_part_characters(self) -> None:
        """
        The local part is made of C{a-z 0-9 . _ -} only: URL syntax, Postfix
        routing operators and quoting never reach the API.
        """
        self.assertTable(
            [
                ("a.b_c-d@example.org", "a.b_c-d@example.org"),
                ("0123456789@example.org", "0123456789@example.org"),
                ("u!x@example.org", None),
                ("u%x@example.org", None),
                ("u/x@example.org", None),
                ("u?x@example.org", None),
                ("u#x@example.org", None),
                ("u+x@example.org", None),
                ("u,x@example.org", None),
                ("u:x@example.org", None),
                ('"u x"@example.org', None),
                ("u\\x@example.org", None),
                ("ünïcode@example.org", None),
                ("..@example.org", "..@example.org"),
            ]
        )

    def test_domain(self) -> None:
        """
        The domain must be a plausible host name: no empty labels, no path or
        URL syntax, no underscores or edge hyphens; one trailing dot (the DNS
        root) is dropped.
        """
        self.assertTable(
            [
                ("user@example.org.", "user@example.org"),
                ("USER@EXAMPLE.ORG.", "user@example.org"),
                ("user@example.org..", None),
                ("user@exa..mple.org", None),
                ("user@.example.org", None),
                ("user@..", None),
                ("user@a/b", None),
                ("user@example.org/../alias", None),
                ("user@ex?ample.org", None),
                ("user@ex#ample.org", None),
                ("user@ex%2fample.org", None),
                ("user@-example.org", None),
                ("user@example-.org", None),
                ("user@ex_ample.org", None),
                ("user@[127.0.0.1]", None),
                ("user@localhost", "user@localhost"),
                ("user@mail-1.example.org", "user@mail-1.example.org"),
            ]
        )

    def test_idn(self) -> None:
        """
        Internationalised domains pass in either spelling (Postfix may hand on
        SMTPUTF8 domains as they are); Unicode is lower-cased too.
        """
        self.assertTable(
            [
                ("user@bücher.de", "user@bücher.de"),
                ("user@BÜCHER.DE", "user@bücher.de"),
                ("user@xn--bcher-kva.de", "user@xn--bcher-kva.de"),
                ("user@例え.テスト", "user@例え.テスト"),
            ]
        )

    def test_too_long(self) -> None:
        """Keys longer than any address can be are refused."""
        self.assertIsNone(normalise_address("a" * 320 + "@example.org"))
        self.assertIsNone(normalise_address("user@" + "a." * 127 + "org"))


class DelimiterTests(SynchronousTestCase):
    """The recipient delimiter: C{user+tag@x} is looked up as C{user@x}."""

    def test_single_character(self) -> None:
        """The local part is cut at the first delimiter."""
        table = [
            ("user+tag@example.org", "user@example.org"),
            ("User+Tag@Example.org", "user@example.org"),
            ("user+tag+more@example.org", "user@example.org"),
            ("user+@example.org", "user@example.org"),
            ("user+t!g@example.org", "user@example.org"),
            ("user-tag@example.org", "user-tag@example.org"),
            ("user@example.org", "user@example.org"),
        ]
        for raw, expected in table:
            self.assertEqual(normalise_address(raw, "+"), expected, raw)

    def test_multiple_characters(self) -> None:
        """Like Postfix, every character of the delimiter setting is a delimiter."""
        table = [
            ("user+tag@example.org", "user@example.org"),
            ("user-tag@example.org", "user@example.org"),
            ("user-a+b@example.org", "user@example.org"),
            ("a.b_c-d@example.org", "a.b_c@example.org"),
        ]
        for raw, expected in table:
            self.assertEqual(normalise_address(raw, "+-"), expected, raw)

    def test_empty_local_part(self) -> None:
        """A key that is all tag (C{+tag@x}) has an empty local part: refused."""
        self.assertIsNone(normalise_address("+tag@example.org", "+"))
        self.assertIsNone(normalise_address("-+@example.org", "+-"))

    def test_without_delimiter(self) -> None:
        """Without a configured delimiter, C{+} is just an invalid character."""
        self.assertIsNone(normalise_address("user+tag@example.org", ""))

    def test_control_character_behind_delimiter(self) -> None:
        """
        A control character in the tag is not cut away unseen with the tag:
        the key is refused, as the same key without a delimiter would be.
        """
        for raw in ("user+\n@example.org", "user+ta\x00g@example.org", "user+\u200b@example.org"):
            self.assertIsNone(normalise_address(raw, "+"), repr(raw))

    def test_delimiter_in_domain_untouched(self) -> None:
        """Only the local part is cut; a delimiter character in the domain stays."""
        self.assertEqual(
            normalise_address("user@mail-1.example.org", "-"), "user@mail-1.example.org"
        )


class NormaliseDomainTests(SynchronousTestCase):
    """L{normalise_domain}, for domain lookups and the domain half of addresses."""

    def test_table(self) -> None:
        """Case, whitespace and a trailing dot are normalised; non-host names are refused."""
        table: list[tuple[str, str | None]] = [
            ("Example.ORG", "example.org"),
            ("example.org.", "example.org"),
            (" example.org\u200b", "example.org"),
            ("\ufeffexample.org\n", "example.org"),
            ("health-check.invalid", "health-check.invalid"),
            ("bücher.de", "bücher.de"),
            ("xn--bcher-kva.de", "xn--bcher-kva.de"),
            ("localhost", "localhost"),
            ("", None),
            (".", None),
            ("..", None),
            ("example.org..", None),
            ("exa..mple.org", None),
            (".example.org", None),
            ("a/b", None),
            ("../alias", None),
            ("x?y", None),
            ("x#y", None),
            ("a%2fb", None),
            ("ex ample.org", None),
            ("ex\x00ample.org", None),
            ("ex\u200bample.org", None),
            ("example.org\n.net", None),
            ("example\n.org", None),
            ("exam\rple.org", None),
            ("-a.org", None),
            ("a-.org", None),
            ("a_b.org", None),
            ("user@example.org", None),
            ("[::1]", None),
            ("a" * 254, None),
        ]
        for raw, expected in table:
            self.assertEqual(normalise_domain(raw), expected, repr(raw))


class PropertyTests(SynchronousTestCase):
    """Properties that hold for every key, not just the table's."""

    @given(st.text(max_size=80), st.sampled_from(["", "+", "+-"]))
    def test_idempotent(self, raw: str, delimiter: str) -> None:
        """A normalised address normalises to itself: one mailbox, one spelling."""
        once = normalise_address(raw, delimiter)
        if once is not None:
            self.assertEqual(normalise_address(once, delimiter), once)

    @given(st.text(max_size=80))
    def test_no_url_syntax(self, raw: str) -> None:
        """
        No accepted key carries characters that would change the meaning of
        a URL path, whatever Postfix sends.
        """
        for result in (normalise_address(raw), normalise_domain(raw)):
            if result is not None:
                for char in "/?#%\\ \t\r\n\x00":
                    self.assertNotIn(char, result)


# Characters that may never be inside a key: every control, format and
# separator character (line breaks, NUL, DEL, C1 controls, zero-width
# space, BOM, bidi marks, Unicode line and paragraph separators) and
# whitespace of any kind.
invisible = st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]) | st.sampled_from(
    "\n\r\t\x00\x0b\x0c\x1f\x7f\x85\u200b\u2028\u2029\ufeff "
)
local_parts = st.text("abcdefghijklmnopqrstuvwxyz0123456789._-+ABC", min_size=1, max_size=20)
labels = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True) | st.sampled_from(
    ["bücher", "例え", "xn--bcher-kva"]
)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
addresses = st.builds(lambda local, domain: f"{local}@{domain}", local_parts, domains)


def _inside(key: str, position: int, char: str) -> str:
    """C{char} put strictly between the first and the last character of C{key}."""
    at = 1 + position % (len(key) - 1)
    return key[:at] + char + key[at:]


class ControlCharacterPropertyTests(SynchronousTestCase):
    """
    A key with a control, format or whitespace character anywhere inside
    is no Userli address, whatever the character, wherever it is, and
    whatever the delimiter; at the trimmed ends the same characters change
    nothing.
    """

    @given(addresses, st.integers(min_value=0), invisible, st.sampled_from(["", "+", "+-"]))
    def test_address_inside(self, key: str, position: int, char: str, delimiter: str) -> None:
        """Such a character inside an address key refuses it."""
        self.assertIsNone(normalise_address(_inside(key, position, char), delimiter))

    @given(domains.filter(lambda d: len(d) > 1), st.integers(min_value=0), invisible)
    def test_domain_inside(self, domain: str, position: int, char: str) -> None:
        """Such a character inside a domain key refuses it."""
        self.assertIsNone(normalise_domain(_inside(domain, position, char)))

    @given(
        addresses,
        st.lists(invisible, max_size=3).map("".join),
        st.lists(invisible, max_size=3).map("".join),
        st.sampled_from(["", "+"]),
    )
    def test_ends_trimmed(self, key: str, before: str, after: str, delimiter: str) -> None:
        """Around the key, they are trimmed: the key means what it means without them."""
        self.assertEqual(
            normalise_address(before + key + after, delimiter), normalise_address(key, delimiter)
        )
        domain = key.partition("@")[2]
        self.assertEqual(normalise_domain(before + domain + after), normalise_domain(domain))

    @given(st.text(max_size=80), st.sampled_from(["", "+", "+-"]))
    def test_never_in_result(self, raw: str, delimiter: str) -> None:
        """No accepted key, from any input, holds such a character."""
        for result in (normalise_address(raw, delimiter), normalise_domain(raw)):
            if result is not None:
                self.assertTrue(result.isprintable(), repr(result))
                self.assertNotIn(" ", result)
                for char in result:
                    self.assertNotIn(unicodedata.category(char), ("Cc", "Cf", "Zl", "Zp", "Zs"))
