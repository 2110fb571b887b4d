"""`python -m lsp_server` serves over stdio; with a subcommand it is the `parafill` command."""
import sys

from lsp_server.cli import COMMANDS, main

argv = sys.argv[1:]
if not any(arg in COMMANDS for arg in argv) and "-h" not in argv and "--help" not in argv:
    argv = ["serve", *argv]
sys.exit(main(argv))
