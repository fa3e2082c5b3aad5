"""The engine's sub-command parsers: a usage error is a message on stderr and status 2, never a traceback."""

from __future__ import annotations

import argparse
import sys


class UsageErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
