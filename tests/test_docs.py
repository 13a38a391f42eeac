"""
The README and the pages under C{docs/} hold together: every relative link
leads to a file of the repository, every C{#anchor} to a heading of its
page, and the README stays short enough for a mail admin to read.

Anchors follow GitHub's rules for headings: the heading's text (a link's
text, not its target), lower case, every character that is not a letter, a
digit, C{_}, C{-} or a space removed, spaces turned into C{-}, and C{-1},
C{-2}, ... added to repeated ones. Code (fenced blocks and inline spans) is
neither a heading nor a link.

The checker is tested on samples it must catch, so it cannot pass by
finding nothing.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 520

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_INLINE_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*<?(\S+?)>?(?:[ \t]+.*)?$", re.MULTILINE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def pages() -> list[Path]:
    """The README and every Markdown page under C{docs/}."""
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """C{text} without fenced code blocks (each line kept, emptied)."""
    kept: list[str] = []
    fenced = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
            kept.append("")
        else:
            kept.append("" if fenced else line)
    return "\n".join(kept)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading (before any C{-1} for a repeat)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor the headings of a Markdown page give."""
    seen: Counter[str] = Counter()
    found: set[str] = set()
    for line in _prose(text).split("\n"):
        match = _HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def links(text: str) -> list[str]:
    """The target of every link and image of a Markdown page, code left out."""
    prose = _CODE_SPAN.sub("", _prose(text))
    return _INLINE_LINK.findall(prose) + _REFERENCE.findall(prose)


def brokenLinks(page: Path, root: Path) -> list[str]:
    """Every relative link of C{page} that leads nowhere in C{root}, with why."""
    broken: list[str] = []
    for target in links(page.read_text(encoding="utf-8")):
        if _SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path if path else page).resolve()
        if not where.is_relative_to(root.resolve()):
            broken.append(f"{target}: outside the repository")
        elif not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and where.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that is not Markdown")
        elif anchor and anchor not in anchors(where.read_text(encoding="utf-8")):
            broken.append(f"{target}: no such heading")
    return broken


class SlugTests(SynchronousTestCase):
    """Headings give the anchors GitHub gives them."""

    def test_headings(self) -> None:
        """Code marks and punctuation go, C{-} and C{_} stay, spaces become C{-}."""
        cases = {
            "Quick start": "quick-start",
            "Outgoing TLS (`tls_policy`)": "outgoing-tls-tls_policy",
            "The `userli-postfix` command": "the-userli-postfix-command",
            "`userli-postfix cache drop MAP KEY` and `cache flush [MAP]`": (
                "userli-postfix-cache-drop-map-key-and-cache-flush-map"
            ),
            "Mail through Postfix: Userli calls and CPU per message": (
                "mail-through-postfix-userli-calls-and-cpu-per-message"
            ),
            "systemd, with socket activation": "systemd-with-socket-activation",
            "The previous version's table": "the-previous-versions-table",
            "See [the README](../README.md)": "see-the-readme",
        }
        self.assertEqual({heading: slug(heading) for heading in cases}, cases)

    def test_repeatedAndFenced(self) -> None:
        """A repeated heading gets C{-1}; a C{#} line in a code block is no heading."""
        text = "# Title\n\n## Docker\n\n```\n# main.cf\n```\n\n### Docker ###\n"
        self.assertEqual(anchors(text), {"title", "docker", "docker-1"})


class BrokenLinkTests(SynchronousTestCase):
    """The checker finds every kind of broken link, and only those."""

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root)
        (self.root / "docs").mkdir()
        (self.root / "deploy").mkdir()
        (self.root / "LICENSE").write_text("")
        (self.root / "docs" / "other.md").write_text("# Other\n\n## A `b` c\n")

    def check(self, text: str) -> list[str]:
        page = self.root / "docs" / "page.md"
        page.write_text(f"# Page\n\n## Here\n\n{text}\n")
        return brokenLinks(page, self.root)

    def test_sound(self) -> None:
        """Files, directories, headings of the page and of another page, URLs are fine."""
        self.assertEqual(
            self.check(
                "[a](other.md) [b](../LICENSE) [c](../deploy/) [d](#here)\n"
                "[e](other.md#a-b-c) ![f](other.md) [g](https://example.org/x#y)\n"
                "[h\ntext](mailto:x@example.org)\n\n[ref]: other.md#other\n"
            ),
            [],
        )

    def test_broken(self) -> None:
        """A missing file, a missing heading here or there, a way out of the repository."""
        self.assertEqual(
            self.check(
                "[a](missing.md) [b](#nowhere) [c](other.md#nowhere)\n"
                "[d](../../outside.md) [e](../LICENSE#L1)\n\n[ref]: gone/\n"
            ),
            [
                "missing.md: no such file",
                "#nowhere: no such heading",
                "other.md#nowhere: no such heading",
                "../../outside.md: outside the repository",
                "../LICENSE#L1: an anchor into a file that is not Markdown",
                "gone/: no such file",
            ],
        )

    def test_code(self) -> None:
        """Links in code blocks and code spans are examples, not links."""
        self.assertEqual(self.check("`[a](missing.md)`\n\n```\n[b](#nowhere)\n```\n"), [])


class DocumentationTests(SynchronousTestCase):
    """The documentation of this repository."""

    def test_links(self) -> None:
        """Every relative link and anchor of the README and of C{docs/} resolves."""
        broken = [
            f"{page.relative_to(ROOT)}: {problem}"
            for page in pages()
            for problem in brokenLinks(page, ROOT)
        ]
        self.assertEqual(broken, [])

    def test_docsLinkedFromReadme(self) -> None:
        """Every page under C{docs/} is reached from the README."""
        targets = {target.partition("#")[0] for target in links(README.read_text("utf-8"))}
        orphans = [page.name for page in pages()[1:] if f"docs/{page.name}" not in targets]
        self.assertEqual(orphans, [])

    def test_readmeShort(self) -> None:
        """The README is for the people who run the daemon: at most 520 lines."""
        lines = README.read_text(encoding="utf-8").count("\n")
        self.assertLessEqual(lines, README_MAX_LINES)
