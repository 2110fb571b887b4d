"""A small file to try parafill on: `parafill complete examples/demo.py:21:19`
asks for the rest of the unfinished last line, where the cursor would be in an editor."""
import json
from pathlib import Path


def load_settings(path: Path) -> dict:
    """Read a JSON settings file, or return an empty dict if it is missing."""
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object, got {type(data).__name__}")
    return data


def save_settings(path: Path, data: dict) -> None:
    """Write `data` to `path` as indented JSON, the format load_settings reads."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(
