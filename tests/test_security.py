"""Static checks of the package's security defaults (no Ray, no models): nothing loads pickle
unguarded, remote code stays off unless the config turns it on, YAML is read safely.

cluster.yaml's ports (dashboard / jobs / GCS / client kept off the public internet) are checked in
tests/test_cluster_yaml.py::test_no_public_control_ports and ::test_ray_start_commands.
"""
from __future__ import annotations

import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "raydistill", "**", "*.py"), recursive=True)
                 + glob.glob(os.path.join(ROOT, "jobs", "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py")))


def _trees():
    for path in SOURCES:
        with open(path, encoding="utf-8") as f:
            yield os.path.relpath(path, ROOT), ast.parse(f.read(), filename=path)


def _name(func: ast.AST) -> str:
    """Dotted name of a call target: torch.load, pickle.loads, yaml.load, np.load, ..."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _calls():
    for rel, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                yield rel, node


def test_sources_found():
    assert any(p.endswith(os.path.join("raydistill", "models.py")) for p in SOURCES)
    assert any(p.endswith(os.path.join("raydistill", "train.py")) for p in SOURCES)


def test_torch_load_always_weights_only():
    seen = []
    for rel, call in _calls():
        if _name(call.func) == "torch.load":
            seen.append(rel)
            assert _is_true(_kw(call, "weights_only")), f"{rel}:{call.lineno}: torch.load without weights_only=True"
    assert seen, "the optimizer checkpoint is loaded with torch.load somewhere; the scan found none"


def test_no_pickle_modules():
    banned_modules = {"pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
    for rel, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & banned_modules, f"{rel}:{node.lineno}: imports {names & banned_modules}"


def test_no_unsafe_loaders():
    for rel, call in _calls():
        name = _name(call.func)
        if name in ("np.load", "numpy.load"):
            assert not _is_true(_kw(call, "allow_pickle")), f"{rel}:{call.lineno}: np.load(allow_pickle=True)"
        if name == "yaml.load":
            loader = _kw(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
            assert loader is not None and "Unsafe" not in ast.unparse(loader) and \
                ast.unparse(loader) not in ("yaml.Loader", "Loader", "yaml.FullLoader"), \
                f"{rel}:{call.lineno}: yaml.load with loader {ast.unparse(loader) if loader else None}"
        bare = isinstance(call.func, ast.Name)   # eval(...), not model.eval()
        if name in ("yaml.unsafe_load", "yaml.full_load", "torch.jit.load") or (bare and name in ("eval", "exec")):
            pytest.fail(f"{rel}:{call.lineno}: {name}")
        if name.endswith("from_pretrained"):
            assert not _is_true(_kw(call, "trust_remote_code")), \
                f"{rel}:{call.lineno}: from_pretrained(trust_remote_code=True) hard-coded"
            wo = _kw(call, "weights_only")
            assert not (isinstance(wo, ast.Constant) and wo.value is False), \
                f"{rel}:{call.lineno}: from_pretrained(weights_only=False)"


def test_trust_remote_code_never_defaults_to_true():
    found = 0
    for rel, call in _calls():
        if _is_true(_kw(call, "trust_remote_code")):
            pytest.fail(f"{rel}:{call.lineno}: trust_remote_code=True passed literally")
    for rel, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                pos = args.posonlyargs + args.args
                defaults = dict(zip([a.arg for a in pos[len(pos) - len(args.defaults):]], args.defaults))
                defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
                for arg in ("trust_remote_code", "allow_pickle_weights"):
                    if arg in defaults:
                        found += 1
                        assert not _is_true(defaults[arg]), f"{rel}:{node.lineno}: {node.name}({arg}=True)"
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                    node.target.id in ("trust_remote_code", "allow_pickle_weights"):
                found += 1
                assert not _is_true(node.value), f"{rel}:{node.lineno}: {node.target.id} defaults to True"
    assert found >= 3


def test_config_defaults_are_safe():
    from raydistill.config import Config

    cfg = Config()
    assert cfg.teacher.trust_remote_code is False and cfg.teacher.allow_pickle_weights is False


def test_pickle_weights_load_with_weights_only():
    """The one path that may read pickle weights passes weights_only=True to transformers."""
    import inspect

    from raydistill import models

    src = inspect.getsource(models.load_causal_lm)
    assert 'kwargs["weights_only"] = True' in src and 'kwargs["use_safetensors"] = True' in src


def test_store_reads_only_parquet_and_json():
    """The store's readers parse Parquet (pyarrow) and the manifest (json) — nothing executable."""
    from raydistill import store

    src = open(store.__file__, encoding="utf-8").read()
    tree = ast.parse(src)
    readers = {_name(c.func) for c in ast.walk(tree) if isinstance(c, ast.Call)}
    assert {"pq.read_table", "json.loads"} <= readers
    assert not {n for n in readers if n.split(".")[0] in ("pickle", "np", "torch")}
