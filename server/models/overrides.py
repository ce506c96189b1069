"""What a load request may carry besides the model's name, as Triton defines it: `config`, a
JSON ModelConfig that replaces config.pbtxt for that load, and `file:<version>/<name>` model
files, written to a private directory for the load and removed after it, never into the
user's repository."""

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from server.errors import InvalidInput
from server.models.model_limits import MAX_LOAD_FILES
from server.models.names import NAME_MAX, is_model_name

log = logging.getLogger(__name__)

CONFIG = "config"
FILE_PREFIX = "file:"
PATH_MAX = 1024  # bytes in a whole relative path: far beyond any model layout


def parse_load_parameters(name: str, parameters: Mapping[str, object]) -> tuple[str | None, dict[str, bytes]]:
    """(config or None, files) from a load request's parameters; InvalidInput names the bad one."""
    config, files = None, {}
    for key, value in parameters.items():
        if key == CONFIG:
            if not isinstance(value, str):
                raise InvalidInput(f"failed to load '{name}': parameter 'config' must be a string of JSON")
            config = value
        elif key.startswith(FILE_PREFIX):
            if not isinstance(value, bytes):
                raise InvalidInput(f"failed to load '{name}': parameter {key!r} must carry the file's bytes")
            files[key[len(FILE_PREFIX) :]] = value
        else:
            raise InvalidInput(
                f"failed to load '{name}': unknown parameter {key!r}; a load takes 'config' and 'file:<version>/<name>'"
            )
    return config, files


def check_files(name: str, files: Mapping[str, bytes], config: str | None) -> None:
    """Refuse what cannot be written safely, before anything is written."""
    if config is None:
        raise InvalidInput(f"failed to load '{name}': 'file:' parameters need a 'config' parameter too, as in Triton")
    if not is_model_name(name):
        raise InvalidInput(f"failed to load '{name}': the model name must be one path component")
    if len(files) > MAX_LOAD_FILES:  # each is a file written and removed in a worker thread
        raise InvalidInput(
            f"failed to load '{name}': 'file:' parameters: {len(files)} exceeds onnxserve's limit of {MAX_LOAD_FILES}"
        )
    for relative in files:
        problem = _path_problem(relative)
        if problem:
            raise InvalidInput(f"failed to load '{name}': parameter '{FILE_PREFIX}{_shorten(relative)}': {problem}")


def _path_problem(relative: str) -> str:
    encoded = relative.encode("utf-8", "surrogateescape")
    parts = PurePosixPath(relative).parts
    if not relative or relative.startswith("/") or "\\" in relative or "\0" in relative:
        return "the path must be relative, with '/' between its parts"
    if len(encoded) > PATH_MAX:
        return f"the path is {len(encoded)} bytes long; at most {PATH_MAX}"
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX for part in parts):
        return f"a path component is longer than {NAME_MAX} bytes"
    if any(part in (".", "..") for part in relative.split("/")) or "" in relative.split("/"):
        return "the path must not contain '.', '..' or empty parts"
    return ""


def _shorten(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def write_private_copy(name: str, files: Mapping[str, bytes]) -> Path:
    """Blocking: a new directory, readable by this process only, holding <root>/<name>/<files>;
    returns <root>. InvalidInput when the files cannot be laid out (a file where a directory must be)."""
    root = Path(tempfile.mkdtemp(prefix="onnxserve-load-"))
    try:
        model_dir = root / name
        model_dir.mkdir(mode=0o700)
        for relative, content in files.items():
            target = model_dir / relative
            if not target.resolve().is_relative_to(model_dir.resolve()):  # after check_files, a last guard
                raise InvalidInput(f"failed to load '{name}': parameter '{FILE_PREFIX}{relative}' leaves its directory")
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(target, "xb", opener=lambda path, flags: os.open(path, flags, 0o600)) as handle:
                handle.write(content)
    except OSError as err:
        remove_private_copy(root)
        raise InvalidInput(
            f"failed to load '{name}': the 'file:' parameters cannot be laid out as files: {err}"
        ) from None
    except InvalidInput:
        remove_private_copy(root)
        raise
    return root


def remove_private_copy(root: Path) -> None:
    """Blocking; a leftover is logged, as the load's own outcome matters more."""
    try:
        shutil.rmtree(root)
    except OSError as err:
        log.warning("could not remove the load's private directory %s: %s", root, err)
