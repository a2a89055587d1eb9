"""`pagemill`: one command for the whole tool (`[project.scripts]` in pyproject.toml).

    pagemill run [key=value ...]          the main job (the same Hydra overrides as python -m pipeline.run)
    pagemill report OUTPUT                HTML report with plots
    pagemill inspect OUTPUT --doc D       one page: layout boxes drawn, markdown, quality signals
    pagemill documents OUTPUT             rebuild documents/ (or --export DIR as markdown files)
    pagemill export OUTPUT --format dolma|jsonl|webdataset --dest URI
    pagemill publish OUTPUT --repo org/name   Hugging Face dataset: clean snapshot + card, uploaded

Each subcommand is the module of the same name's `main`, so `python -m pipeline.<name>` keeps
working; this module only dispatches (argparse for the list, the rest of argv passed through).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pipeline.run", "run the job: PDFs -> one Parquet row per page (Hydra overrides: key=value ...)"),
    "report": ("pipeline.report", "HTML report with plots of an output (-> OUTPUT/_report/index.html)"),
    "inspect": (
        "pipeline.inspect",
        "one page of an output: layout boxes drawn, markdown and quality signals",
    ),
    "documents": ("pipeline.documents", "rebuild documents/ from pages/, or --export DIR as markdown files"),
    "export": ("pipeline.export", "hand-off shards: --format dolma|jsonl|webdataset --dest URI (Ray Data)"),
    "publish": (
        "pipeline.publish",
        "Hugging Face dataset: clean snapshot + dataset card, uploaded (--repo org/name; --dry-run)",
    ),
}


def add_storage_options(
    p: argparse.ArgumentParser, flag: str = "--storage-options", of: str = "OUTPUT"
) -> None:
    """The tools' `--storage-options JSON` flag: fsspec options of an object store (the same as
    the job's `output.storage_options` / `input.storage_options`)."""
    p.add_argument(
        flag,
        default="{}",
        metavar="JSON",
        help=f'fsspec options of {of}, e.g. \'{{"endpoint_url": "http://…"}}\' (credentials: use the environment)',
    )


def parse_storage_options(
    p: argparse.ArgumentParser, value: str, flag: str = "--storage-options"
) -> dict[str, Any]:
    """The parsed `--storage-options` value; anything but a JSON object is a usage error (exit 2)."""
    try:
        opts = json.loads(value)
        if not isinstance(opts, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        p.error(f"{flag} must be a JSON object ({e})")
    return opts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pagemill",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PDF collections -> DeepSeek-OCR markdown + layout Parquet, on Ray.",
        epilog="'pagemill COMMAND --help' shows a command's options ('pagemill run --help': the Hydra config).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser().parse_args(argv)  # --help, or an unknown command: argparse prints and exits
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    if name == "run":  # Hydra reads sys.argv itself
        sys.argv = [f"pagemill {name}", *rest]
        module.main()
        return 0
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
