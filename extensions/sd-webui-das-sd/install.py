"""Run by the webui at start-up (A1111 / Forge / SD.Next): make `das_sd` importable in the webui's venv.

Idempotent and offline: das-sd is installed from the das-sd checkout this extension folder lives in
(or links to), or from DAS_SD_SOURCE; nothing is downloaded when it is already installed.
"""

import os
import subprocess
import sys
from pathlib import Path

try:
    import das_sd  # noqa: F401
except ImportError:
    here = Path(__file__).resolve().parent
    candidates = [os.environ.get("DAS_SD_SOURCE"), here.parent.parent]
    source = next((Path(c) for c in candidates if c and (Path(c) / "pyproject.toml").is_file()), None)
    if source is None:
        print("[das-sd] das_sd is not installed: run `pip install <path to the das-sd checkout>` in the "
              "webui's venv, or set DAS_SD_SOURCE to that checkout", file=sys.stderr)
    else:
        # An argument list, not the webui's launch.run_pip: that one builds a shell command line, and a
        # checkout path holding quotes or $(...) would run as shell code.
        print(f"[das-sd] installing das-sd from {source}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", str(source)], check=True)
