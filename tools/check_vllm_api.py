"""Check a vLLM source tree against the vLLM API the plugin uses, without importing vLLM.

Place: reads `vllm_kvzap.compat.SYMBOLS` (where each vLLM symbol the plugin uses lives, per vLLM
version, with the parameters the plugin passes and the members it reads) and the plugin's own
source (`vllm_kvzap/**/*.py`: the vLLM methods its classes override), and checks a vLLM source
tree (an installed vLLM or an unpacked wheel) with `ast` alone, so that it works for versions
that cannot be imported here. The reports for the supported versions are in `tools/vllm_api/`.

    python -m tools.check_vllm_api SOURCE [--json PATH] [--version X.Y.Z]

SOURCE is a directory holding `vllm/`, or the `vllm` package directory itself; the version comes
from `vllm/_version.py` unless `--version` is given. For each symbol, at its location for that
version: the module exists, the name is defined (or imported from within vLLM) at its top level,
a class has the members the plugin uses (in its body, as `self.X = ...` in a method, or in a base
class), and each callable takes the parameters the plugin passes (a def with `**kwargs` accepts
anything: noted). For each method a plugin class overrides, vLLM's parameter names must be the
plugin's (the plugin may add trailing parameters with defaults, or take `*args, **kwargs`).
Exit status: 0 when nothing is wrong, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(REPO))

from vllm_kvzap import compat

PLUGIN_DIR = REPO / "vllm_kvzap"
_DEF = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_FUNC = (ast.FunctionDef, ast.AsyncFunctionDef)


# --- version and tree --------------------------------------------------------------------------


def package_dir(source: str | Path) -> Path:
    """The `vllm` package directory of SOURCE (a directory holding `vllm/`, or that package)."""
    source = Path(source)
    return source / "vllm" if (source / "vllm" / "__init__.py").exists() else source


def tree_version(pkg: Path) -> str:
    """`__version__` as assigned in `vllm/_version.py` (`__version__ = version = '0.34.0'`)."""
    for node in ast.walk(ast.parse((pkg / "_version.py").read_text())):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
        ):
            return str(node.value.value)
    raise ValueError(f"no __version__ in {pkg / '_version.py'}")


def _bindings(body: list[ast.stmt], module: str, is_package: bool) -> dict[str, list[tuple]]:
    """Names bound by these statements (descending into if/try/with), each as a list of
    ("def", node) | ("from", module, name) | ("import", module) | ("key", node)."""
    out: dict[str, list[tuple]] = {}

    def add(name, entry):
        out.setdefault(name, []).append(entry)

    def visit(stmts):
        for st in stmts:
            if isinstance(st, _DEF):
                add(st.name, ("def", st))
            elif isinstance(st, (ast.Assign, ast.AnnAssign)):
                targets = st.targets if isinstance(st, ast.Assign) else [st.target]
                for t in targets:
                    for n in t.elts if isinstance(t, ast.Tuple) else [t]:
                        if isinstance(n, ast.Name):
                            add(n.id, ("def", st))
                if isinstance(st.value, ast.Dict):  # e.g. envs.environment_variables
                    for k in st.value.keys:
                        if isinstance(k, ast.Constant) and isinstance(k.value, str):
                            add(k.value, ("key", st))
            elif isinstance(st, ast.ImportFrom):
                src = _absolute(module, is_package, st.module, st.level)
                for a in st.names:
                    add(a.asname or a.name, ("from", src, a.name))
            elif isinstance(st, ast.Import):
                for a in st.names:
                    if a.asname:
                        add(a.asname, ("import", a.name))
                    else:
                        add(a.name.split(".")[0], ("import", a.name.split(".")[0]))
            elif isinstance(st, ast.If):
                visit(st.body), visit(st.orelse)
            elif isinstance(st, ast.Try):
                visit(st.body), visit(st.orelse), visit(st.finalbody)
                for h in st.handlers:
                    visit(h.body)
            elif isinstance(st, ast.With):
                visit(st.body)

    visit(body)
    return out


def _absolute(module: str, is_package: bool, name: str | None, level: int) -> str:
    if not level:
        return name or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def _priority(entry: tuple) -> int:
    return {"def": 0, "from": 1, "import": 2, "key": 3}[entry[0]]


class Tree:
    """A vLLM package directory, read with `ast` on demand; `read`: the files it looked at."""

    def __init__(self, pkg: Path):
        self.pkg = pkg
        self.read: set[Path] = set()
        self._modules: dict[str, tuple[ast.Module, dict] | None] = {}

    def module_path(self, module: str) -> Path | None:
        parts = module.split(".")
        if parts[0] != "vllm":
            return None
        base = self.pkg.joinpath(*parts[1:])
        for path in ([base.with_suffix(".py")] if parts[1:] else []) + [base / "__init__.py"]:
            if path.is_file():
                self.read.add(path)
                return path
        return None

    def _load(self, module: str):
        if module not in self._modules:
            path = self.module_path(module)
            loaded = None
            if path is not None:
                node = ast.parse(path.read_text(), str(path))
                loaded = node, _bindings(node.body, module, path.name == "__init__.py")
            self._modules[module] = loaded
        return self._modules[module]

    def names(self, module: str) -> dict[str, list[tuple]]:
        loaded = self._load(module)
        return loaded[1] if loaded else {}

    def lookup(self, module: str, name: str, seen: frozenset = frozenset()):
        """Where `name`, bound at the top level of `module`, is defined: (module, node), node
        None for a module; following imports while they stay inside vLLM; None if nowhere."""
        if (module, name) in seen:
            return None
        seen |= {(module, name)}
        for entry in sorted(self.names(module).get(name, []), key=_priority):
            if entry[0] == "def":
                return module, entry[1]
            if entry[0] == "from" and self.module_path(entry[1]):
                found = self.lookup(entry[1], entry[2], seen)
                if found is None and self.module_path(f"{entry[1]}.{entry[2]}"):
                    found = f"{entry[1]}.{entry[2]}", None
                if found:
                    return found
            if entry[0] == "import" and self.module_path(entry[1]):
                return entry[1], None
        if name in self.names(module) or self.module_path(f"{module}.{name}") is None:
            return None
        return f"{module}.{name}", None  # a submodule

    def lookup_expr(self, module: str, expr: ast.expr):
        """Resolve a base-class expression (`Name`, `mod.Name`, `Generic[T]`) in `module`."""
        if isinstance(expr, ast.Subscript):
            return self.lookup_expr(module, expr.value)
        if isinstance(expr, ast.Name):
            return self.lookup(module, expr.id)
        if isinstance(expr, ast.Attribute):
            found = self.lookup_expr(module, expr.value)
            if found and found[1] is None:
                return self.lookup(found[0], expr.attr)
        return None

    def mro(self, module: str, cls: ast.ClassDef, out=None) -> list[tuple[str, ast.ClassDef]]:
        """The class and its bases that resolve inside the tree (depth first, each once)."""
        out = [] if out is None else out
        if not any(cls is seen for _, seen in out):
            out.append((module, cls))
            for base in cls.bases:
                found = self.lookup_expr(module, base)
                if found and isinstance(found[1], ast.ClassDef):
                    self.mro(*found, out)
        return out

    def member(self, module: str, cls: ast.ClassDef, name: str):
        """(module, node) of class member `name`: in a class body (defs, assignments, fields),
        as `self.name = ...` in a method, or in a base class; None if nowhere."""
        for mod, c in self.mro(module, cls):
            entries = _bindings(c.body, mod, False).get(name, [])
            defs = [e[1] for e in entries if e[0] == "def"]
            if defs:
                return mod, next((d for d in defs if isinstance(d, _FUNC)), defs[0])
            if entries:  # imported into the class body: rare
                return mod, None
            for fn in (n for n in ast.walk(c) if isinstance(n, _FUNC)):
                for node in ast.walk(fn):
                    targets = (
                        node.targets if isinstance(node, ast.Assign)
                        else [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign))
                        else []
                    )  # fmt: skip
                    for t in targets:
                        if (
                            isinstance(t, ast.Attribute)
                            and t.attr == name
                            and isinstance(t.value, ast.Name)
                            and t.value.id == "self"
                        ):
                            return mod, node
        return None

    def resolve(self, location: str):
        """(module, node) at "pkg.mod" or "pkg.mod:Qual.name", or a problem string."""
        module, _, qualname = location.partition(":")
        if self.module_path(module) is None:
            rel = module.replace(".", "/")
            return f"module {module} not found (no {rel}.py or {rel}/__init__.py)"
        found = module, None
        for i, part in enumerate(qualname.split(".") if qualname else []):
            mod, node = found
            where = qualname.split(".")[:i] or [module]
            if node is None:
                found = self.lookup(mod, part)
            elif isinstance(node, ast.ClassDef):
                found = self.member(mod, node, part)
            else:
                found = None
            if found is None:
                return f"{part} not defined in {'.'.join(where)}"
        return found

    def init_params(self, module: str, cls: ast.ClassDef):
        """The `__init__` def of a class, or the names of its dataclass fields."""
        chain = self.mro(module, cls)
        for i, (mod, c) in enumerate(chain):
            init = _bindings(c.body, mod, False).get("__init__", [])
            init = [e[1] for e in init if e[0] == "def" and isinstance(e[1], _FUNC)]
            if init:
                return init[0]
            if _is_dataclass(c):
                return [f for _, d in reversed(chain[i:]) if _is_dataclass(d) for f in _fields(d)]
        return []


def _is_dataclass(cls: ast.ClassDef) -> bool:
    for d in cls.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        name = d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", "")
        if name in ("dataclass", "config"):  # vLLM's config classes: @config, a dataclass
            return True
    return False


def _fields(cls: ast.ClassDef) -> list[str]:
    return [
        st.target.id for st in cls.body
        if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)
        and "ClassVar" not in ast.unparse(st.annotation)
    ]  # fmt: skip


# --- signatures --------------------------------------------------------------------------------


def _params(fn) -> tuple[list[str], list[bool], ast.arguments]:
    """A def's parameter names (positional and keyword-only, without self/cls), whether each
    has a default, and its `ast.arguments`."""
    a = fn.args
    positional = a.posonlyargs + a.args
    has_default = [False] * (len(positional) - len(a.defaults)) + [True] * len(a.defaults)
    has_default += [d is not None for d in a.kw_defaults]
    pairs = [(p.arg, d) for p, d in zip(positional + a.kwonlyargs, has_default)]
    pairs = [(n, d) for n, d in pairs if n not in ("self", "cls")]
    return [n for n, _ in pairs], [d for _, d in pairs], a


def check_params(target, wanted: tuple[str, ...], what: str) -> tuple[list[str], list[str]]:
    """Problems and notes for passing `wanted` (names) to `target` (a def or dataclass fields)."""
    if isinstance(target, list):  # dataclass fields
        names, varkw = target, None
    elif isinstance(target, _FUNC):
        names, _, args = _params(target)
        varkw = args.kwarg.arg if args.kwarg else None
    else:
        return [f"{what} is not a def: cannot check its parameters {', '.join(wanted)}"], []
    missing = [w for w in wanted if w not in names]
    if not missing:
        return [], []
    if varkw:
        return [], [f"{what}: {', '.join(missing)} accepted by **{varkw}"]
    return [f"{what} has no parameter {', '.join(missing)}"], []


def check_symbol(tree: Tree, name: str, symbol: compat.Symbol, version) -> dict:
    location = symbol.location_for(version)
    problems: list[str] = []
    notes: list[str] = []
    if location is None:  # not in this version (`Symbol.since`): the plugin does not use it there
        since = ".".join(map(str, symbol.since))
        return {"name": name, "location": None, "ok": True, "problems": [],
                "notes": [f"absent before vLLM {since}: not used"]}  # fmt: skip
    found = tree.resolve(location)
    if isinstance(found, str):
        problems.append(found)
    else:
        mod, node = found
        if symbol.calls:
            if isinstance(node, ast.ClassDef):
                target, what = tree.init_params(mod, node), f"{node.name}.__init__"
            else:
                target, what = node, f"{location.rpartition(':')[2] or location}()"
            p, n = check_params(target, symbol.calls, what)
            problems += p
            notes += n
        for member, wanted in symbol.members.items():
            if node is None:  # a module: its top-level names and module-level dict keys
                entry = tree.lookup(mod, member) or (member in tree.names(mod) and (mod, None))
            elif isinstance(node, ast.ClassDef):
                entry = tree.member(mod, node, member)
            else:
                entry = None
            if not entry:
                problems.append(f"no member {member}")
            elif wanted:
                p, n = check_params(entry[1], wanted, f"{member}()")
                problems += p
                notes += n
    return {"name": name, "location": location, "ok": not problems, "problems": problems,
            "notes": notes}  # fmt: skip


# --- the plugin's overrides --------------------------------------------------------------------


_BY_LOCATION = {s.location: s for s in compat.SYMBOLS.values()}


def plugin_subclasses(version, plugin_dir: Path = PLUGIN_DIR):
    """(file, class, base label, base location for `version`) for each plugin class whose base
    comes from `vllm_kvzap.compat` or (before the plugin imported everything from it) `vllm`."""
    out = []
    for path in sorted(plugin_dir.rglob("*.py")):
        rel = path.relative_to(plugin_dir.parent)
        module = ".".join(rel.with_suffix("").parts)
        tree = ast.parse(path.read_text(), str(path))
        imported: dict[str, str] = {}  # local name -> vLLM location
        compat_aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                src = _absolute(module, path.name == "__init__.py", node.module, node.level)
                for a in node.names:
                    local = a.asname or a.name
                    if src == "vllm_kvzap.compat" and a.name in compat.SYMBOLS:
                        imported[local] = compat.SYMBOLS[a.name].location_for(version)
                    elif src == "vllm_kvzap" and a.name == "compat":
                        compat_aliases.add(local)
                    elif src == "vllm" or src.startswith("vllm."):
                        loc = f"{src}:{a.name}"
                        known = _BY_LOCATION.get(loc)
                        imported[local] = known.location_for(version) if known else loc
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "vllm_kvzap.compat" and a.asname:
                        compat_aliases.add(a.asname)
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for base in cls.bases:
                if isinstance(base, ast.Name) and base.id in imported:
                    out.append((str(rel), cls, base.id, imported[base.id]))
                elif (
                    isinstance(base, ast.Attribute)
                    and isinstance(base.value, ast.Name)
                    and base.value.id in compat_aliases
                    and base.attr in compat.SYMBOLS
                ):
                    loc = compat.SYMBOLS[base.attr].location_for(version)
                    out.append((str(rel), cls, base.attr, loc))
    return out


def compare_override(plugin_fn, vllm_fn, label: str) -> list[str]:
    """Problems of `plugin_fn` overriding `vllm_fn` (`label`: "Plugin.m overrides Base.m")."""
    args = plugin_fn.args
    if args.vararg or args.kwarg:
        return []
    mine, defaults, _ = _params(plugin_fn)
    theirs, _, vargs = _params(vllm_fn)
    sig = f"{label}({', '.join(theirs)})"
    missing = [n for n in theirs if n not in mine]
    if missing:
        return [f"{sig}: plugin lacks {', '.join(missing)}"]
    if mine[: len(theirs)] != theirs:
        return [f"{sig}: plugin's order differs ({', '.join(mine)})"]
    extra = [n for n, d in zip(mine[len(theirs) :], defaults[len(theirs) :]) if not d]
    if extra:
        return [f"{sig}: plugin's extra {', '.join(extra)} has no default"]
    star = [f"*{vargs.vararg.arg}"] if vargs.vararg else []
    star += [f"**{vargs.kwarg.arg}"] if vargs.kwarg else []
    if star:
        return [f"{sig}: vLLM's takes {', '.join(star)}, the plugin's does not"]
    return []


def check_overrides(tree: Tree, version, plugin_dir: Path = PLUGIN_DIR) -> list[dict]:
    rows = []
    for rel, cls, base_name, location in plugin_subclasses(version, plugin_dir):
        found = tree.resolve(location)
        if isinstance(found, str) or not isinstance(found[1], ast.ClassDef):
            problem = found if isinstance(found, str) else f"{location} is not a class"
            rows.append({"class": cls.name, "file": rel, "base": location, "method": None,
                         "ok": False, "problems": [f"base {base_name}: {problem}"]})  # fmt: skip
            continue
        chain = tree.mro(*found)
        for fn in (st for st in cls.body if isinstance(st, _FUNC)):
            theirs = next(
                ((c, d) for m, c in chain for e, d in _bindings(c.body, m, False).get(fn.name, [])
                 if e == "def" and isinstance(d, _FUNC)), None,
            )  # fmt: skip
            if theirs is None:
                continue
            label = f"{cls.name}.{fn.name} overrides {theirs[0].name}.{fn.name}"
            problems = compare_override(fn, theirs[1], label)
            rows.append({"class": cls.name, "file": rel, "base": location, "method": fn.name,
                         "overrides": f"{theirs[0].name}.{fn.name}", "ok": not problems,
                         "problems": problems})  # fmt: skip
    return rows


# --- entry point -------------------------------------------------------------------------------


def check(source: str | Path, version_text: str | None = None, plugin_dir: Path = PLUGIN_DIR):
    """The report for a vLLM tree (see the module docstring), and the Tree (`.read`: files)."""
    pkg = package_dir(source)
    tree = Tree(pkg)
    version_text = version_text or tree_version(pkg)
    version = compat.parse_version(version_text)
    if version is None:
        raise ValueError(f"cannot parse vLLM version {version_text!r}")
    symbols = [check_symbol(tree, n, s, version) for n, s in compat.SYMBOLS.items()]
    overrides = check_overrides(tree, version, plugin_dir)
    report = {
        "vllm_version": version_text,
        "source": str(source),
        "plugin_range": compat.SUPPORTED,
        "ok": all(r["ok"] for r in symbols + overrides),
        "symbols": symbols,
        "overrides": overrides,
    }
    return report, tree


def files_read(source: str | Path, version_text: str | None = None) -> list[Path]:
    """The files of the vLLM tree the check reads (relative to the `vllm` package directory)."""
    _, tree = check(source, version_text)
    files = {p.relative_to(tree.pkg) for p in tree.read}
    return sorted(files | {Path("__init__.py"), Path("_version.py")})


def summary(report: dict) -> str:
    problems = sum(len(r["problems"]) for r in report["symbols"] + report["overrides"])
    checked = sum(r["method"] is not None for r in report["overrides"])
    return (f"vLLM {report['vllm_version']}: {len(report['symbols'])} symbols, "
            f"{checked} overrides checked, {problems} problems")  # fmt: skip


def render(report: dict) -> str:
    lines = []
    width = max(len(r["name"]) for r in report["symbols"])
    for r in report["symbols"]:
        tail = "; ".join(r["problems"] + [f"({n})" for n in r["notes"]])
        lines.append(f"{'OK' if r['ok'] else 'FAIL':4} {r['name']:{width}} {r['location']}"
                     + (f"  {tail}" if tail else ""))  # fmt: skip
    for r in report["overrides"]:
        what = f"{r['class']}.{r['method']}" if r["method"] else r["class"]
        lines.append(f"{'OK' if r['ok'] else 'FAIL':4} override {what} ({r['file']})"
                     + (f"  {'; '.join(r['problems'])}" if r["problems"] else ""))  # fmt: skip
    lines.append(summary(report))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a directory holding vllm/, or the vllm package itself")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--version", help="the vLLM version (default: from vllm/_version.py)")
    args = parser.parse_args(argv)
    report, _ = check(args.source, args.version)
    print(render(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
