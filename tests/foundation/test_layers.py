"""Layers point one way (issue 23): shim -> resource -> agent_client / hypervisor -> vmm, and no import cycle.

An AST scan of every module under src/katapy, nothing imported.  Two checks:

* the layer rules, over *every* import statement: top level, under
  ``if TYPE_CHECKING:`` (a type is a dependency too) and inside functions (a
  lazy import is still a dependency; it only runs later).  Each top-level
  package has a rank in ``LAYERS``; a module may import its own package and
  packages of a strictly lower rank, so siblings of one rank (hypervisor and
  agent_client) do not import each other.  The guest agent is a world of its
  own: it imports only ``GUEST_MAY_IMPORT`` (the packages both worlds share,
  which the guest image carries), and no host module imports it.
* no import cycle among modules through the imports that run when a module
  is imported: top-level ones, not those under ``if TYPE_CHECKING:`` (never
  run) nor those inside functions (they run after every module involved has
  loaded, which is how a lazy import breaks a cycle at run time).  Importing
  ``katapy.a.b`` also runs ``katapy/a/__init__.py``, so that package is an
  edge too, unless the importer is inside it (then it is already loading).
  The cycles are the strongly connected components of that graph.  A
  stricter check adds the lazy imports: a cycle they close is deferred, not
  gone (the kvm cpuid one was such).

Each failure names the importing module, its file and line, and the module imported.
"""
from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

#: Rank of each top-level package: higher layers import lower ones, never the reverse.
LAYERS: dict[str, int] = {
    # -- foundation: usable from every layer; imports nothing of katapy above it
    "katapy": 0,  # the package root: __version__ only
    "katapy.paths": 0,  # where katapy's files live (repository, state, images)
    "katapy.log": 0,  # structlog set-up of the host processes
    "katapy.linux": 0,  # thin helpers over Linux interfaces (tun/tap queues, the fd limit), no policy
    "katapy.pb": 0,  # generated protobuf modules, both worlds
    "katapy.upcall": 0,  # the upcall wire format (VMM <-> guest), both worlds
    "katapy.protocol": 0,  # the agent's wire types and side-channel framings (host <-> guest), both worlds
    "katapy.ttrpc": 1,  # the RPC protocol over pb (client: host; sync server: guest)
    "katapy.config": 1,  # configuration.toml, typed (uses paths)
    "katapy.osbuilder": 1,  # builds the guest kernel and image (uses paths; reads the agent's sources as files)
    # -- the runtime, bottom to top
    "katapy.vmm": 2,  # the built-in VMM: KVM, memory, boot, virtio devices; knows nothing above it
    "katapy.hypervisor": 3,  # the Hypervisor interface and its backends (builtin over vmm, qemu)
    "katapy.agent_client": 3,  # the host's client of the guest agent (ttrpc), a sibling of hypervisor
    "katapy.resource": 4,  # a sandbox's host resources (network, cgroups, devices, rootfs), over both
    "katapy.metrics": 4,  # Prometheus exposition of a sandbox's figures, and the monitor
    "katapy.shim": 5,  # the containerd shim: service, dispatcher, sandbox and container managers
    # -- tools on top of everything
    "katapy.testing": 6,  # helpers and pytest plugins that start VMs and sandboxes for tests
    "katapy.cli": 7,  # the `katapy` command line (its `sandbox` subcommand uses testing)
    # -- the guest world: not ranked with the host; see GUEST and GUEST_MAY_IMPORT
    "katapy.agent": -1,  # the guest agent (PID 1 in the VM)
}

#: The guest agent's package: it runs in the VM, under slow emulation at times, from a small image.
GUEST = "katapy.agent"
#: What the agent may import: the packages shared by both worlds (all of them in the guest image).
GUEST_MAY_IMPORT = frozenset({"katapy", "katapy.pb", "katapy.ttrpc", "katapy.upcall", "katapy.protocol"})

#: (importer, imported) pairs that break a rule and are allowed for now; each says why and until when.
TEMPORARY_ALLOWANCES: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    path: Path
    line: int
    target: str  # the module imported (for ``from M import name``: ``M.name`` when that is a module)
    lazy: bool  # inside a function: runs when it is called
    typing_only: bool  # under ``if TYPE_CHECKING:``: never runs

    def where(self) -> str:
        shown = self.path.relative_to(SRC.parent) if self.path.is_relative_to(SRC.parent) else self.path
        return f"{shown}:{self.line}"


def modules(src: Path = SRC) -> dict[str, Path]:
    """Every module under ``src/katapy``, by name (a package by its ``__init__.py``)."""
    found: dict[str, Path] = {}
    for path in sorted((src / "katapy").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def package_of(module: str) -> str:
    """The top-level package a module belongs to: ``katapy.vmm`` for ``katapy.vmm.kvm.vcpu``."""
    return ".".join(module.split(".")[:2])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def scan(name: str, path: Path, known: Iterable[str]) -> list[Import]:
    """The imports of katapy modules in one module, each with where it is and whether it runs at import."""
    known = set(known)
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found: list[Import] = []

    def add(node: ast.stmt, target: str, lazy: bool, typing_only: bool) -> None:
        if target == "katapy" or target.startswith("katapy."):
            found.append(Import(name, path, node.lineno, target, lazy, typing_only))

    def visit(node: ast.AST, lazy: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(child, alias.name, lazy, typing_only)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = here.split(".")[: len(here.split(".")) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                for alias in child.names:
                    sub = f"{source}.{alias.name}"
                    add(child, sub if sub in known else source, lazy, typing_only)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True, typing_only)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), lazy, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), lazy, typing_only)
            else:
                visit(child, lazy, typing_only)

    visit(ast.parse(path.read_text(), str(path)), False, False)
    return found


@functools.cache
def all_imports(src: Path = SRC) -> tuple[Import, ...]:
    mods = modules(src)
    return tuple(imp for name, path in mods.items() for imp in scan(name, path, mods))


def layer_violations(imports: Iterable[Import], layers: dict[str, int] = LAYERS,
                     allowances: frozenset[tuple[str, str]] = TEMPORARY_ALLOWANCES) -> list[str]:
    """One line per import that points up, sideways, or across the host/guest border."""
    out = []
    reported: set[tuple[str, int, str]] = set()
    for imp in imports:
        src, dst = package_of(imp.importer), package_of(imp.target)
        if src == dst or (imp.importer, imp.target) in allowances:
            continue
        if src == GUEST:
            why = None if dst in GUEST_MAY_IMPORT else (
                f"the guest agent imports only {sorted(GUEST_MAY_IMPORT)}, the packages both worlds share")
        elif dst == GUEST:
            why = "a host module imports the guest agent's package (share a module of katapy.protocol instead)"
        elif layers[dst] >= layers[src]:
            how = "a sibling" if layers[dst] == layers[src] else "a higher layer"
            why = f"{src} (rank {layers[src]}) imports {how}, {dst} (rank {layers[dst]})"
        else:
            why = None
        if why and (imp.importer, imp.line, imp.target) not in reported:
            reported.add((imp.importer, imp.line, imp.target))
            kind = " (lazy)" if imp.lazy else " (TYPE_CHECKING)" if imp.typing_only else ""
            out.append(f"{imp.where()}: {imp.importer} imports {imp.target}{kind}: {why}")
    return out


def runtime_graph(imports: Iterable[Import], lazy: bool = False) -> dict[str, dict[str, Import]]:
    """importer -> {module it makes Python load while it is imported: the import statement}; with
    ``lazy``, also the modules its functions load when called."""
    graph: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.typing_only or (imp.lazy and not lazy):
            continue
        edges = graph.setdefault(imp.importer, {})
        parts = imp.target.split(".")
        # the target and every package above it that is not already loading (an ancestor of the importer)
        for n in range(2, len(parts) + 1):
            pkg = ".".join(parts[:n])
            if pkg != imp.importer and not (imp.importer + ".").startswith(pkg + "."):
                edges.setdefault(pkg, imp)
    return graph


def strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def cycle_in(component: list[str], graph: dict[str, dict[str, Import]]) -> list[Import]:
    """One cycle through the component's first module, as the import statements that close it (BFS)."""
    members = set(component)
    start = component[0]
    came: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child, imp in sorted(graph.get(node, {}).items()):
                if child not in members or child in came:
                    continue
                came[child] = imp
                if child == start:
                    path, at = [], start
                    while True:
                        path.append(came[at])
                        at = came[at].importer
                        if at == start:
                            return path[::-1]
                nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle in component {component}")


def cycle_reports(imports: Iterable[Import], lazy: bool = False) -> list[str]:
    graph = runtime_graph(imports, lazy)
    out = []
    for component in strongly_connected(graph):
        steps = cycle_in(component, graph)
        chain = " -> ".join([steps[0].importer] + [s.target for s in steps])
        detail = "; ".join(f"{s.where()}: {s.importer} imports {s.target}{' (lazy)' if s.lazy else ''}"
                           for s in steps)
        out.append(f"import cycle among {len(component)} modules {component}: {chain} ({detail})")
    return out


# -- the checks ------------------------------------------------------------------


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in modules()}
    missing = sorted(packages - LAYERS.keys())
    assert not missing, f"top-level packages with no row in LAYERS (decide their layer): {missing}"


def test_layers_point_one_way():
    problems = layer_violations(all_imports())
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_the_guest_image_carries_everything_the_agent_imports():
    """Every katapy module the agent can reach (lazy imports too) is in a package osbuilder puts in the image."""
    from katapy.osbuilder.image import AGENT_PACKAGES

    shipped = {"katapy"} | {f"katapy.{p}" for p in AGENT_PACKAGES}
    assert GUEST_MAY_IMPORT <= shipped, f"shared with the guest but not in its image: {GUEST_MAY_IMPORT - shipped}"
    by_importer: dict[str, list[Import]] = {}
    for imp in all_imports():
        by_importer.setdefault(imp.importer, []).append(imp)
    seen: set[str] = set()
    todo = [m for m in modules() if package_of(m) == GUEST]
    outside = []
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        for imp in by_importer.get(mod, []):
            if package_of(imp.target) not in shipped:
                outside.append(f"{imp.where()}: {imp.importer} imports {imp.target}")
            todo.append(imp.target)
    assert not outside, "the agent reaches modules the guest image lacks:\n" + "\n".join(outside)


def test_no_import_cycle():
    problems = cycle_reports(all_imports())
    assert not problems, "\n".join(problems)


def test_no_import_cycle_even_through_lazy_imports():
    """Stricter: a lazy import that closes a cycle defers the cycle, it does not remove it (the cpuid
    helpers in kvm.system once tied system -> vm -> vcpu -> system this way).  Type-only imports still
    do not count: a back-reference for an annotation is not a dependency at run time."""
    problems = cycle_reports(all_imports(), lazy=True)
    assert not problems, "\n".join(problems)


def test_the_scan_sees_lazy_typing_and_cyclic_imports(tmp_path):
    """The checks above can fail: a made-up tree with an upward lazy import, a guest import and a cycle."""
    files = {
        "katapy/__init__.py": "",
        "katapy/vmm/__init__.py": "",
        "katapy/vmm/a.py": "from katapy.vmm import b\n",
        "katapy/vmm/b.py": "import katapy.vmm.c\n",
        "katapy/vmm/c.py": ("from typing import TYPE_CHECKING\n"
                            "from katapy.vmm.a import X\n"
                            "if TYPE_CHECKING:\n    from katapy.shim.x import Y\n"
                            "def f():\n    from katapy.resource import z\n"),
        "katapy/shim/__init__.py": "",
        "katapy/shim/x.py": "import katapy.agent.types\nfrom katapy.vmm import c\n",
        "katapy/agent/__init__.py": "",
        "katapy/agent/types.py": "def g():\n    import katapy.log\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    mods = modules(tmp_path)
    imports = [imp for name, path in mods.items() for imp in scan(name, path, mods)]
    layers = {"katapy": 0, "katapy.log": 0, "katapy.vmm": 2, "katapy.resource": 4, "katapy.shim": 5,
              "katapy.agent": -1}
    problems = layer_violations(imports, layers, frozenset())
    assert any(":4: katapy.vmm.c imports katapy.shim.x (TYPE_CHECKING)" in p for p in problems), problems
    assert any(":6: katapy.vmm.c imports katapy.resource (lazy)" in p for p in problems), problems
    assert any(":1: katapy.shim.x imports katapy.agent.types: a host module" in p for p in problems), problems
    assert any(":2: katapy.agent.types imports katapy.log (lazy): the guest agent" in p for p in problems), problems
    assert len(problems) == 4, problems
    (cycle,) = cycle_reports(imports)
    assert "katapy.vmm.a -> katapy.vmm.b -> katapy.vmm.c -> katapy.vmm.a" in cycle, cycle
    assert "vmm/c.py:2: katapy.vmm.c imports katapy.vmm.a" in cycle, cycle
    lazy_only = [i for i in imports if i.importer != "katapy.vmm.c"] + [
        Import("katapy.vmm.c", mods["katapy.vmm.c"], 9, "katapy.vmm.a", True, False)]
    assert cycle_reports(lazy_only) == []
    (cycle,) = cycle_reports(lazy_only, lazy=True)
    assert "vmm/c.py:9: katapy.vmm.c imports katapy.vmm.a" in cycle, cycle
