"""The package's rooms and who may use what (server/__init__.py's map), read from the imports of
every module: a change that would tie the engine to a front end, or the server to its tools,
fails here before the process split that depends on it does."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "server"
ROOMS = ("frontend", "engine", "models", "observe", "tune", "tools")
SHARED = (
    "config",
    "config_checks",
    "errors",
    "protocol",
    "protos_generated",
    "tensors",
    "bytes_codec",
    "processes",
    "followed_file",
    "cuda_runtime",
)
ROOT = (
    "__main__",
    "app",
    "shutdown",
    "frontends",
)  # the composition root: wiring, the command line, the stop, the processes
# What each room may import of the others, besides the shared modules and itself.
MAY_IMPORT = {
    "frontend": {"engine", "models", "observe"},
    "engine": {"models", "observe"},
    "models": {"engine", "observe"},
    "observe": set(),
    "tune": {"tools", "models", "observe"},
    "tools": {"engine", "observe"},
    "shared": {"models"},  # config_checks bounds the default batch and queue sizes as config.pbtxt does
}


def home(module: str) -> str:
    """The room of `server.a.b`: a folder, "shared" or "root"."""
    parts = module.split(".")[1:]
    if parts and parts[0] in ROOMS:
        return parts[0]
    return "root" if parts and parts[0] in ROOT else "shared"


def imports(path: Path) -> set[str]:
    """The server modules `path` imports when it runs; imports for type annotations only (under
    `if TYPE_CHECKING:`) name a type, not a dependency, and are left out."""
    tree, found = ast.parse(path.read_text()), set()
    skipped = {
        id(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and id(node) in skipped:
            for inner in ast.walk(node):
                skipped.add(id(inner))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "server":
            found.update(
                f"{node.module}.{alias.name}"
                if node.module in ("server", *(f"server.{r}" for r in ROOMS))
                else node.module
                for alias in node.names
            )
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "server")
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("server", *path.relative_to(PACKAGE).with_suffix("").parts))
        yield name.removesuffix(".__init__"), path


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda value: str(value) if isinstance(value, str) else "")
def test_each_module_imports_only_what_its_room_may(module, path):
    room = home(module)
    allowed = {"shared", room} | MAY_IMPORT.get(room, set())
    wrong = sorted(name for name in imports(path) if home(name) not in allowed and room != "root")
    assert not wrong, f"{module} ({room}) imports {wrong}; {room} may import {sorted(allowed)}"


# What a front end uses of the engine and the models when it runs: a request's record and answer,
# and the name rules. Whatever else it holds of them comes in its Backend, named only for
# annotations; model_info alone reads the models' live state, until the engine publishes it.
FRONTEND_REACH = {"server.engine.call", "server.engine.queued", "server.models.names"}
LIVE_STATE_READERS = {"server.frontend.model_info": {"server.models.repository", "server.models.model_config"}}


@pytest.mark.parametrize(
    "module,path",
    [m for m in modules() if home(m[0]) == "frontend"],
    ids=lambda v: str(v) if isinstance(v, str) else "",
)
def test_a_front_end_reaches_the_engine_only_through_its_request_vocabulary(module, path):
    reach = FRONTEND_REACH | LIVE_STATE_READERS.get(module, set())
    wrong = sorted(name for name in imports(path) if home(name) in ("engine", "models") and name not in reach)
    assert not wrong, f"{module} imports {wrong} when it runs; a front end may use only {sorted(reach)}"


def test_nothing_imports_the_root_but_the_root():
    wrong = sorted(
        (module, name)
        for module, path in modules()
        if home(module) != "root"
        for name in imports(path)
        if home(name) == "root"
    )
    assert not wrong


def test_every_room_says_what_it_owns_and_may_import():
    for room in ROOMS:
        doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text())) or ""
        assert len(doc) > 100, f"server/{room}/__init__.py has no docstring saying what it owns"
        assert "May import" in doc, f"server/{room}/__init__.py does not say what it may import"


def test_a_front_end_process_runs_without_onnxruntime():
    """What `python -m server.frontend.process` imports: no onnxruntime, no batcher, no repository."""
    probe = "import sys, server.frontend.process; print(sorted(m for m in sys.modules if m.startswith(('onnxruntime', 'server.engine.batching', 'server.models.repository'))))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=PACKAGE.parent
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"a front end imports {result.stdout.strip()}"
