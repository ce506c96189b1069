"""What may name a model and a version, checked before anything quotes or opens the name: a log
line, an error message, a path in the repository. Pure functions, so a front end checks a name as
it arrives, before the request goes any further.

Two rules, because the two questions differ: `model_name_problem` says whether a caller's name can
be served (one path component, printable, at most NAME_MAX bytes), `is_model_name` whether a
directory found in the repository is a model (hidden directories, such as `.git`, are not)."""

from server.errors import InvalidInput, shown

NAME_MAX = 255  # bytes in one path component (Linux): a model's name is its directory's


def model_name_problem(name: str) -> str:
    """Why `name` cannot be a model's name, or "" when it can: it must be one directory name in the
    repository, and it reaches log lines, where a newline would forge a line of its own."""
    if not name:
        return "the model name is empty"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > NAME_MAX:
        return f"the model name is {size} bytes long; at most {NAME_MAX}"
    if not name.isprintable():  # control characters, line separators, bidi and zero-width marks
        index, character = next((i, c) for i, c in enumerate(name) if not c.isprintable())
        return f"the model name must not contain control or invisible characters (U+{ord(character):04X} at {index})"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "the model name must be one path component (no '/', '\\', '.' or '..')"
    return ""


def check_model_name(name: str) -> None:
    """InvalidInput naming the problem, with the name shortened and escaped."""
    if problem := model_name_problem(name):
        raise InvalidInput(f"{problem}: {shown(name)!r}")


def check_version(version: str) -> None:
    """A version is a number (Triton refuses others as invalid too); "" asks for the latest."""
    if version and not (version.isascii() and version.isdigit()):
        raise InvalidInput(f"the model version must be a number: {shown(version)!r}")


def is_model_name(name: str) -> bool:
    """One path component that stays inside the repository."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name and not name.startswith(".")
