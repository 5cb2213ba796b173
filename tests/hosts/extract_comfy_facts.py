"""Record the ComfyUI contract the stand-in must match, from a real checkout (names only, no code).

    python tests/hosts/extract_comfy_facts.py /path/to/ComfyUI > tests/hosts/comfy_facts.json
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from extract_webui_facts import params


def functions(path: Path, names: list[str]) -> dict:
    tree = ast.parse(path.read_text())
    return {n.name: params(n) for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in names}


def main(root: str) -> None:
    root_path = Path(root)
    execution = (root_path / "execution.py").read_text()
    facts = {
        "host": "ComfyUI",
        "commit": subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "nodes.py": functions(root_path / "nodes.py", ["load_custom_node"]),
        "folder_paths.py": functions(root_path / "folder_paths.py",
                                     ["get_full_path", "get_temp_directory", "get_filename_list"]),
        "execution.py": {
            "hidden_kinds": sorted(set(re.findall(r'h\[x\] == "([A-Z_]+)"', execution))),
            "runs_under_inference_mode": "with torch.inference_mode():" in execution,
            "splits_ui_and_result": "'ui'" in execution and "'result'" in execution,
        },
    }
    json.dump(facts, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
