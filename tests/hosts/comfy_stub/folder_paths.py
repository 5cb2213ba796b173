"""Stand-in for ComfyUI's folder_paths: model folders by kind, and the temp directory."""

import os
import tempfile

folder_names_and_paths: dict[str, list[str]] = {"loras": []}


def get_full_path(folder_name, filename):
    for folder in folder_names_and_paths.get(folder_name, []):
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    return None


def get_filename_list(folder_name):
    return sorted(f for d in folder_names_and_paths.get(folder_name, []) for f in os.listdir(d))


def get_temp_directory():
    return tempfile.gettempdir()
