"""`python -m prunevlm.lmms_eval export DIR [--images N]`: the demo test split as lmms-eval tasks."""

from __future__ import annotations

import argparse

from .tasks import export, usage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prunevlm.lmms_eval", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tasks = commands.add_parser("export", help="write the demo test split as lmms-eval tasks into DIR")
    tasks.add_argument("dir", help="folder for the images, the JSONL and the task YAML (created)")
    tasks.add_argument("--images", type=int, default=200, help="test images, 6 questions each (as prunevlm eval)")
    args = parser.parse_args(argv)
    try:
        path = export(args.dir, args.images)
    except ValueError as error:
        parser.error(str(error))
    print(usage(path))


if __name__ == "__main__":
    main()
