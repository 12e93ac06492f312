"""Static contract check of ``pipeline/rollout/sglang_engine.py`` against the SGLang release pinned in
``requirements-gpu.txt``: its wheel is downloaded once without dependencies (cached in ``~/.cache/lampo/wheels``, or
``$LAMPO_WHEEL_CACHE``) and read with ``ast``, never imported (SGLang needs a GPU). Skipped, saying why, when the wheel
cannot be downloaded (offline).

What we use is read from our code: ``ENGINE_API`` (every ``sglang.Engine`` method and keyword; ``SGLangEngine._call``
refuses anything else, and no other code touches the engine), ``HTTP_ROUTES``, ``engine_kwargs`` and
``request_params``.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.rollout import sglang_engine
from pipeline.rollout.base import SamplingParams
from pipeline.rollout.sglang_engine import ENGINE_API, HTTP_ROUTES, MEMORY_TAGS, engine_kwargs, request_params

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LAMPO_WHEEL_CACHE", Path.home() / ".cache" / "lampo" / "wheels"))


def pinned_version() -> str:
    text = (ROOT / "requirements-gpu.txt").read_text()
    found = re.findall(r"^\s*sglang==([0-9][0-9A-Za-z.+-]*)\s*(?:#.*)?$", text, re.M)
    assert len(found) == 1, "requirements-gpu.txt must pin exactly one sglang release as sglang==X.Y.Z"
    return found[0]


@pytest.fixture(scope="module")
def src():
    """``path inside the wheel -> parsed module`` for the pinned release."""
    version = pinned_version()
    wheels = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
    if not wheels:
        CACHE.mkdir(parents=True, exist_ok=True)
        # the Linux CPython 3.11 wheel whatever this machine is: only its Python sources are read
        cmd = [sys.executable, "-m", "pip", "download", f"sglang=={version}", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux_2_34_x86_64", "--python-version", "3.11", "-d", str(CACHE), "-q",
               "--disable-pip-version-check", "--timeout", "20", "--retries", "1"]  # offline: skip soon
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot download the pinned sglang=={version} wheel to check the contract ({e})")
        wheels = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
        if res.returncode != 0 or not wheels:
            lines = (res.stderr or res.stdout).strip().splitlines() or ["no output"]
            why = next((x for x in reversed(lines) if x.startswith("ERROR")), lines[-1])
            pytest.skip(f"cannot download the pinned sglang=={version} wheel to check the contract (offline?): {why}")
    with zipfile.ZipFile(wheels[-1]) as z:
        meta = z.read(f"sglang-{version}.dist-info/METADATA").decode()
        files = {n: z.read(n).decode() for n in z.namelist() if n.startswith("sglang/srt/") and n.endswith(".py")}
    parsed: dict[str, ast.Module] = {}

    def tree(path: str) -> ast.Module:
        if path not in parsed:
            assert path in files, f"{path} is not in sglang {version}"
            parsed[path] = ast.parse(files[path])
        return parsed[path]

    tree.meta = meta  # type: ignore[attr-defined]
    tree.files = files  # type: ignore[attr-defined]
    return tree


def class_def(module: ast.Module, name: str) -> ast.ClassDef:
    for node in module.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found")


def annotated_fields(cls: ast.ClassDef) -> set[str]:
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def server_args_fields(src) -> set[str]:
    """ServerArgs' input fields: the annotated fields of the namespaces listed in ``_INPUT_NAMESPACES``
    (sglang/srt/server_args.py builds ServerArgs from them with msgspec.defstruct)."""
    server_args = src("sglang/srt/server_args.py")
    namespaces: set[str] = set()
    for node in server_args.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_INPUT_NAMESPACES" for t in node.targets):
            namespaces = {e.id for e in node.value.elts}
    assert namespaces, "_INPUT_NAMESPACES not found in server_args.py"
    fields: set[str] = set()
    for path in src.files:
        if path.startswith("sglang/srt/arg_groups/fields/"):
            for node in src(path).body:
                if isinstance(node, ast.ClassDef) and node.name in namespaces:
                    fields |= annotated_fields(node)
    return fields


def test_the_pinned_release_matches_the_pinned_torch(src):
    torch_pin = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert f"Requires-Dist: torch=={torch_pin}" in src.meta.splitlines()


def test_the_pinned_release_installs_beside_requirements_txt(src):
    """Every package that both requirements.txt and the release require: the release's exact pin (==) must lie in
    our range, so pip can install requirements-gpu.txt on top of requirements.txt (it then moves, e.g.,
    transformers to the release's pin; the README says which)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    ours = {canonicalize_name(r.name): r.specifier for r in (
        Requirement(line.split("#")[0].strip()) for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip())}
    clashes, shared = [], 0
    for line in src.meta.splitlines():
        if not line.startswith("Requires-Dist: "):
            continue
        theirs = Requirement(line.removeprefix("Requires-Dist: "))
        if theirs.marker is not None and not theirs.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(theirs.name)
        pins = [s.version for s in theirs.specifier if s.operator == "=="]
        if name in ours and pins:
            shared += 1
            if not ours[name].contains(pins[0], prereleases=True):
                clashes.append(f"{name}: the release pins {pins[0]}, requirements.txt asks {ours[name]}")
    assert shared >= 3, "too few shared pins found; is the METADATA read right?"
    assert not clashes, clashes


def test_no_engine_call_bypasses_the_engine_api_list():
    """Every call into SGLang goes through ``_call`` (which enforces ENGINE_API), so the list is what the code uses."""
    module = ast.parse(Path(sglang_engine.__file__).read_text())
    direct = [node.attr for node in ast.walk(module) if isinstance(node, ast.Attribute)
              and isinstance(node.value, ast.Attribute) and node.value.attr == "engine"
              and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"]
    assert direct == [], f"self.engine.<method> used directly, bypassing _call/ENGINE_API: {direct}"
    called = {node.args[0].value for node in ast.walk(module) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute) and node.func.attr == "_call"
              and node.args and isinstance(node.args[0], ast.Constant)}
    assert called | {"__init__"} == set(ENGINE_API), "ENGINE_API lists methods the code does not call"
    assert set(engine_kwargs("m", Config())) == set(ENGINE_API["__init__"])


def test_engine_methods_and_keywords_exist_in_the_release(src):
    engine = class_def(src("sglang/srt/entrypoints/engine.py"), "Engine")
    methods = {n.name: n for n in engine.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for method, keywords in ENGINE_API.items():
        if method == "__init__":
            continue
        assert method in methods, f"sglang.Engine has no method {method}"
        a = methods[method].args
        names = {x.arg for x in a.args[1:] + a.kwonlyargs}
        if a.kwarg is None:
            missing = set(keywords) - names
            assert not missing, f"sglang.Engine.{method} has no keyword(s) {sorted(missing)} (has {sorted(names)})"


def test_engine_constructor_keywords_are_server_args(src):
    fields = server_args_fields(src)
    missing = set(ENGINE_API["__init__"]) - fields
    assert not missing, f"sglang.Engine(**kw) builds ServerArgs, which has no field(s) {sorted(missing)}"


def test_sampling_params_keys_exist_in_the_release(src):
    cls = class_def(src("sglang/srt/sampling/sampling_params.py"), "SamplingParams")
    fields = annotated_fields(cls)
    keys = set(request_params(SamplingParams(seed=1), eos_id=2, n_requests=1)[0])
    assert keys - fields == set(), f"sampling_params keys {sorted(keys - fields)} are not SamplingParams fields"


def test_memory_tags_are_all_of_the_release_types(src):
    constants = src("sglang/srt/constants.py")
    values = {n.targets[0].id: n.value for n in constants.body if isinstance(n, ast.Assign)}
    all_types = [values[e.id].value for e in values["GPU_MEMORY_ALL_TYPES"].elts]
    assert sorted(MEMORY_TAGS) == sorted(all_types)


def test_http_routes_are_registered_and_take_our_bodies(src):
    """Each route of HTTP_ROUTES is registered for POST in the http server; the JSON body we send (the method's
    ENGINE_API keywords) consists of fields of the request type the handler parses."""
    server = src("sglang/srt/entrypoints/http_server.py")
    io_struct = src("sglang/srt/managers/io_struct.py")
    handlers: dict[str, tuple[set[str], ast.FunctionDef]] = {}
    for node in server.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and isinstance(dec.func.value, ast.Name) and dec.func.value.id == "app"):
                continue
            if not (dec.args and isinstance(dec.args[0], ast.Constant)):
                continue
            if dec.func.attr == "post":
                verbs = {"POST"}
            elif dec.func.attr == "api_route":
                verbs = {e.value for kw in dec.keywords if kw.arg == "methods" for e in kw.value.elts}
            else:
                continue
            handlers[dec.args[0].value] = (verbs, node)
    for method, route in HTTP_ROUTES.items():
        assert route in handlers, f"the SGLang http server has no route {route}"
        verbs, fn = handlers[route]
        assert "POST" in verbs, f"{route} does not accept POST ({verbs})"
        body = set(ENGINE_API[method])
        if not body:
            continue
        obj = next((a for a in fn.args.args if a.arg == "obj"), None)
        assert obj is not None, f"{route} takes no request body, but we send {sorted(body)}"
        ann = obj.annotation
        if isinstance(ann, ast.Subscript):  # Annotated[ReqInput, Body()]
            ann = ann.slice.elts[0]
        fields = annotated_fields(class_def(io_struct, ann.id))
        assert body <= fields, f"{route}: {ann.id} has no field(s) {sorted(body - fields)}"


def test_the_weight_update_session_and_the_output_layout_are_as_the_engine_expects(src):
    """The facts sglang_engine.py is built on, as source text: tensor updates need the session; the output records
    carry meta_info.output_token_logprobs as (logprob, token_id, text) tuples."""
    updater = src.files["sglang/srt/managers/scheduler_components/weight_updater.py"]
    assert "update_weights_from_tensor must run between" in updater and "offload_tags.remove(tag)" in updater
    manager = src.files["sglang/srt/managers/tokenizer_manager.py"]
    assert 'meta_info["output_token_logprobs"]' in manager
    assert "(logprob, token_id, None)" in manager
