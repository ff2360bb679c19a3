#!/usr/bin/env python3
"""(Re)make the exports of a finished run from its saved config.yaml and adapter.

    python jobs/export.py RUN_DIR                        # what the run's export section asks for
    python jobs/export.py RUN_DIR --gguf f16,q8_0 --ollama
    python jobs/export.py RUN_DIR --force                # re-make merged/, gguf/, Modelfile
    python jobs/export.py RUN_DIR --report               # also (re)write report.md/json/png

Files listed in manifest.json that are missing or differ from it are re-made; what is complete is
left alone, so a re-run on a complete, verified export changes nothing (no file, not even the
manifest, is rewritten). While anything is re-made the manifest is removed, and it is written
again last (ftlib.storage.write_manifest): its presence keeps meaning "complete". The adapter
itself (or a full fine-tune's merged model) is the source and cannot be re-made here.
Exit status 2 with one line for a user error (no such run, unfinished run, bad GGUF type).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftlib.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
