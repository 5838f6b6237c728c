"""docs/architecture.md's import tiers are the code's: every import of the package, at module level
or inside a function, goes from a tier to one below it (never up, never beside)."""

import ast
import os
import re

from tests.helpers.launch import ROOT

PACKAGE = os.path.join(ROOT, "megatron_mmbert")


def documented_tiers():
    """The tier list of docs/architecture.md (the code block after its ``import tiers`` marker), top first."""
    text = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
    block = re.search(r"<!-- import tiers[^>]*-->\s*```\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md lost its import-tier list"
    return [line.split() for line in block.group(1).strip().splitlines()]


def unit_of(relpath):
    """The tier-list name of a source file: ``training/`` for a package's module, ``checkpoints/x.py``
    for the checkpoints package (split across tiers), ``x.py`` for a top-level module."""
    parts = relpath.split(os.sep)
    if len(parts) == 1:
        return parts[0]
    return relpath.replace(os.sep, "/") if parts[0] == "checkpoints" else parts[0] + "/"


def module_file(name):
    """The file of module ``megatron_mmbert.a.b`` (relative to the package), or None if it is not one."""
    rel = os.path.join(*name.split(".")[1:]) if "." in name else ""
    for candidate in (rel + ".py", os.path.join(rel, "__init__.py")):
        if candidate != ".py" and os.path.isfile(os.path.join(PACKAGE, candidate)):
            return candidate
    return None


def imports_of(path):
    """Every ``megatron_mmbert`` module a file imports (module level and inside functions), with lines."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "megatron_mmbert":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}:{node.lineno}: relative import; spell megatron_mmbert.*"
            if node.module.split(".")[0] != "megatron_mmbert":
                continue
            for alias in node.names:  # `from megatron_mmbert.checkpoints import dist` imports a module
                sub = f"{node.module}.{alias.name}"
                yield node.lineno, sub if module_file(sub) else node.module


def test_every_import_goes_down_the_documented_tiers():
    tiers = documented_tiers()
    rank = {name: i for i, line in enumerate(tiers) for name in line}
    assert len(rank) == sum(len(line) for line in tiers), "a name is listed twice"
    problems, seen = [], set()
    for dirpath, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            unit = unit_of(os.path.relpath(path, PACKAGE))
            seen.add(unit)
            if unit not in rank:
                problems.append(f"{unit} is in no tier of docs/architecture.md")
                continue
            for line, name in imports_of(path):
                target_file = module_file(name)
                assert target_file, f"{path}:{line}: {name} is no module of the package"
                target = unit_of(target_file)
                if target == unit:
                    continue
                if target not in rank:
                    problems.append(f"{target} is in no tier of docs/architecture.md")
                elif rank[target] <= rank[unit]:
                    where = "beside" if rank[target] == rank[unit] else "above"
                    problems.append(f"{os.path.relpath(path, ROOT)}:{line} ({unit}) imports {name} ({target}), "
                                    f"a tier {where} its own")
    assert not problems, "\n".join(problems)
    assert set(rank) <= seen, f"tiers name what does not exist: {sorted(set(rank) - seen)}"


def test_the_checker_sees_function_local_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from megatron_mmbert.training import loop\n"
                      "    import megatron_mmbert.cli.options\n")
    assert list(imports_of(str(source))) == [(2, "megatron_mmbert.training.loop"), (3, "megatron_mmbert.cli.options")]
    assert unit_of(module_file("megatron_mmbert.training.loop")) == "training/"
    assert unit_of(module_file("megatron_mmbert.checkpoints.layout")) == "checkpoints/layout.py"
    assert unit_of(module_file("megatron_mmbert")) == "__init__.py"
