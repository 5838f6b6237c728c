"""The package stays readable in parts: no function in ``megatron_mmbert/`` over 80 lines, no module
over 600, outside the exceptions below (each with its reason).

A function's length runs from its ``def`` line to its last line (docstring and nested functions
included, decorators not); a method counts on its own, and so does a function nested in another
(which also counts towards the outer one). A module's length is its number of lines. ``csrc/`` (the
C++ index builder) is outside the package and not measured.
"""

import ast
import os

from tests.helpers.launch import ROOT

PACKAGE = os.path.join(ROOT, "megatron_mmbert")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600

# Modules allowed past MAX_MODULE_LINES, relative to the repository root, with the reason. Config
# schemas only: their length is one docstring per field (the docstring is the field's --help-config
# text and docs), and splitting a schema would scatter one config's fields. They still obey the
# function limit.
MODULE_EXCEPTIONS = {
    "megatron_mmbert/training/config.py": "the run config schema (RunConfig and its 12 sections): 87 fields, "
                                          "each with the docstring --help-config prints",
}

# Functions allowed past MAX_FUNCTION_LINES ("path:qualified name" -> reason): none.
FUNCTION_EXCEPTIONS = {}


def package_modules():
    """(path relative to the repository root, source) of every Python module of the package."""
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    yield os.path.relpath(path, ROOT).replace(os.sep, "/"), f.read()


def function_lengths(source):
    """(qualified name, lines) of every function and method of a module."""
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out.append((name, child.end_lineno - child.lineno + 1))
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")
            else:
                walk(child, prefix)

    walk(ast.parse(source), "")
    return out


def offenders():
    """Every module and function over its limit, with its size, that no exception covers."""
    found = []
    for path, source in package_modules():
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES and path not in MODULE_EXCEPTIONS:
            found.append(f"module {path}: {lines} lines (limit {MAX_MODULE_LINES})")
        for name, n in function_lengths(source):
            if n > MAX_FUNCTION_LINES and f"{path}:{name}" not in FUNCTION_EXCEPTIONS:
                found.append(f"function {path}:{name}: {n} lines (limit {MAX_FUNCTION_LINES})")
    return found


def test_no_function_or_module_over_its_limit():
    found = offenders()
    assert not found, (f"{len(found)} part(s) of megatron_mmbert/ over the size limits -- split each by subject "
                       "(or, for a config schema only, add it to MODULE_EXCEPTIONS with the reason):\n  "
                       + "\n  ".join(found))


def test_every_exception_is_still_needed():
    """An exception that no longer exceeds its limit (or names a file that is gone) is removed."""
    sizes = dict((path, len(source.splitlines())) for path, source in package_modules())
    stale = [p for p in MODULE_EXCEPTIONS if sizes.get(p, 0) <= MAX_MODULE_LINES]
    functions = {f"{path}:{name}": n for path, source in package_modules() for name, n in function_lengths(source)}
    stale += [k for k in FUNCTION_EXCEPTIONS if functions.get(k, 0) <= MAX_FUNCTION_LINES]
    assert not stale, f"exceptions no longer needed (within the limits, or gone): {stale}"


def test_the_measure_counts_methods_nested_functions_and_docstrings():
    source = "class A:\n    def m(self):\n        '''doc\n        more'''\n        def inner():\n            pass\n" \
             "        return inner\n\n\ndef f():\n    pass\n"
    assert function_lengths(source) == [("A.m", 6), ("A.m.inner", 2), ("f", 2)]
