"""
L{userli_postfix.notls}: Twisted without pyOpenSSL.  What it does to a
process cannot be undone, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


def run(code: str) -> Any:
    """Run C{code} in a new interpreter; what it printed last, as JSON."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(result.stderr)
    return json.loads(result.stdout.splitlines()[-1])


class LoadWithoutTLSTests(SynchronousTestCase):
    def test_hidden(self) -> None:
        """
        Twisted's networking and the given modules load without pyOpenSSL;
        the reactor offers no TLS, and the placeholders are gone afterwards.
        """
        state = run(
            """
            import json, sys
            from userli_postfix import notls
            kept_out = notls.loadWithoutTLS(["txredisapi", "userli_postfix.daemon"])
            from twisted.internet import reactor
            from twisted.internet.interfaces import IReactorSSL
            print(json.dumps({
                "kept_out": kept_out,
                "openssl": [
                    m for m in sys.modules if m.split(".")[0] in ("OpenSSL", "cryptography")
                ],
                "daemon": "userli_postfix.daemon" in sys.modules,
                "reactor_ssl": IReactorSSL.providedBy(reactor),
                "placeholders": [m for m in notls.PLACEHOLDER_MODULES if m in sys.modules],
                "loaded": notls.tlsLoaded(),
            }))
            """
        )
        self.assertEqual(
            state,
            {
                "kept_out": True,
                "openssl": [],
                "daemon": True,
                "reactor_ssl": False,
                "placeholders": [],
                "loaded": False,
            },
        )

    def test_placeholder_refuses(self) -> None:
        """What txredisapi took from the TLS modules fails loudly if ever used."""
        error = run(
            """
            import json
            from userli_postfix import notls
            notls.loadWithoutTLS(["txredisapi"])
            import txredisapi
            try:
                txredisapi.ssl.ClientContextFactory()
            except notls.TLSNotLoaded as e:
                print(json.dumps(str(e)))
            """
        )
        self.assertIn("twisted.internet.ssl.ClientContextFactory", error)
        self.assertIn("no TLS", error)

    def test_too_late(self) -> None:
        """Once Twisted's networking is loaded with TLS, nothing is hidden."""
        state = run(
            """
            import json, sys
            import twisted.internet.endpoints
            from userli_postfix import notls
            kept_out = notls.loadWithoutTLS(["userli_postfix.redis"])
            print(json.dumps([kept_out, notls.tlsLoaded(), "userli_postfix.redis" in sys.modules]))
            """
        )
        self.assertEqual(state, [False, True, True])

    def test_tap_options(self) -> None:
        """The twistd options load TLS only for a configuration that uses it."""
        code = """
            import json, os
            os.environ.update(USERLI_TOKEN="t", USERLI_BASE_URL={url!r})
            from userli_postfix import notls, tap
            tap.Options().parseOptions([])
            print(json.dumps(notls.tlsLoaded()))
        """
        self.assertFalse(run(code.format(url="http://userli:8000")))
        self.assertTrue(run(code.format(url="https://userli.example.org")))
