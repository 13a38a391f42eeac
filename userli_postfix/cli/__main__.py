"""C{python -m userli_postfix.cli}: the C{userli-postfix} command."""

from userli_postfix.cli import main

main()
