"""``python -m client_sdk``: the command-line client (see ``client_sdk.cli``)."""

import sys

from client_sdk.cli import main

if __name__ == "__main__":
    sys.exit(main())
