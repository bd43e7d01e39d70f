"""`python -m kvpilot.runtime serve ...`: the pod's entry point, `kvpilot serve` without the operator."""

import sys

from kvpilot.runtime.server.serve import add_serve
from kvpilot.runtime.usage import Parser, run_main


def build_parser() -> Parser:
    parser = Parser(prog="kvpilot", description="The kvpilot runtime: serve a model over the OpenAI API.")
    add_serve(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    return parser


if __name__ == "__main__":
    sys.exit(run_main(build_parser, None))
