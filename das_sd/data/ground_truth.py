"""``ground_truth.json``: a dataset's planted groups (a trigger word and the files that carry it).

The demo writes one (das_sd.toy.demo_data); any dataset may carry its own so that
``das-sd evaluate ground-truth`` can score attribution against it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import json_error

GROUND_TRUTH_VERSION = 1


def load_ground_truth(dataset_root: str | Path) -> dict:
    """Read ``ground_truth.json`` from a dataset folder.

    Args:
        dataset_root: The dataset folder.

    Returns:
        The parsed record: ``version`` and ``groups``, each a ``trigger`` and its ``files``.

    Raises:
        FileNotFoundError: When the folder has no ``ground_truth.json``.
        ValueError: Naming the file and field, when it is malformed or of another version.
    """
    path = Path(dataset_root) / "ground_truth.json"
    try:
        truth = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no ground_truth.json in the dataset folder") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON ({json_error(exc)})") from None
    if truth.get("version") != GROUND_TRUTH_VERSION or not isinstance(truth.get("groups"), list):
        raise ValueError(f"{path}: expected version {GROUND_TRUTH_VERSION} with a 'groups' list")
    for i, group in enumerate(truth["groups"]):
        if not isinstance(group.get("trigger"), str) or not isinstance(group.get("files"), list):
            raise ValueError(f"{path}: groups[{i}] needs 'trigger' (string) and 'files' (list)")
    return truth
