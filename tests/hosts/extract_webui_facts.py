"""Record the webui host contract the stand-in must match, from a real checkout (names only, no code).

    python tests/hosts/extract_webui_facts.py /path/to/stable-diffusion-webui-forge > tests/hosts/webui_facts.json
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path


def params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    names += [f"{x.arg}=" for x in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return names


def module_facts(path: Path, classes: dict[str, list[str] | None], functions: list[str]) -> dict:
    tree = ast.parse(path.read_text())
    out: dict = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in classes:
            methods = {f.name: params(f) for f in node.body if isinstance(f, ast.FunctionDef)}
            wanted = classes[node.name]
            out[node.name] = {m: methods[m] for m in (wanted or methods) if m in methods}
        if isinstance(node, ast.FunctionDef) and node.name in functions:
            out[node.name] = params(node)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "re_extra_net" for t in node.targets):
            out["re_extra_net"] = ast.literal_eval(node.value.args[0])
    return out


def main(root: str) -> None:
    root_path = Path(root)
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    facts = {
        "host": "stable-diffusion-webui-forge",
        "commit": commit,
        "modules/scripts.py": module_facts(root_path / "modules/scripts.py", {
            "Script": ["title", "show", "ui", "process", "postprocess_image", "postprocess", "elem_id"],
            "PostprocessImageArgs": ["__init__"]}, []),
        "modules/script_callbacks.py": module_facts(root_path / "modules/script_callbacks.py", {},
                                                    ["on_ui_tabs", "on_ui_settings", "on_app_started"]),
        "modules/options.py": module_facts(root_path / "modules/options.py", {"OptionInfo": ["__init__"],
                                                                             "Options": ["add_option"]}, []),
        "modules/extra_networks.py": module_facts(root_path / "modules/extra_networks.py",
                                                  {"ExtraNetworkParams": ["__init__"]}, ["parse_prompt"]),
    }
    json.dump(facts, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
