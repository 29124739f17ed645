"""`finetune <command>`: the one entry point (the console script and `python -m finetune`).

Commands that need no Trainer (search, export, interpret, predict from an exported file) are dispatched
before Lightning is imported, so they start in a fraction of the time and run where Lightning
is not installed. The others go through finetune.cli; a mistake the user can fix ends there as
one line (`error: model.backbone: ...`), a bug with its traceback.

Nothing imports this module: it imports the commands, never the reverse.
"""

from __future__ import annotations

import logging
import sys


def _exported(args: list[str]) -> bool:
    return any(a == "--exported" or a.startswith("--exported=") for a in args)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:]
    command = args[:1]
    if command == ["search"]:  # nearest neighbours from saved embeddings
        from finetune.search import main as search_main

        return search_main(args[1:])
    if command == ["export"]:  # ONNX / TorchScript / safetensors from a checkpoint
        from finetune.export.command import main as export_main

        return export_main(args[1:])
    if command == ["interpret"]:  # top losses, confused pairs, likely mislabelled images of a checkpoint
        from finetune.interpret_command import main as interpret_main

        return interpret_main(args[1:])
    if command == ["predict"] and _exported(args):  # an exported .onnx / TorchScript file
        from finetune.predict_exported import main as run_exported

        return run_exported(args[1:])
    from finetune.errors import one_line_errors

    with one_line_errors():
        if command == ["check-data"]:  # fit's config, the DataModule alone: report, exit 1 if unusable
            from finetune.check_data import main as check_data_main

            sys.exit(check_data_main(args[1:]))
        if command == ["prepare"]:  # fit's config, the DataModule alone: its splits as LitData shards
            from finetune.prepare import main as prepare_main

            sys.exit(prepare_main(args[1:]))
        from finetune.cli import run

        run(args)


if __name__ == "__main__":
    main()
