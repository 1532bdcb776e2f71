"""The framework adapters (client/integrations/) stay out of the client's way (issue 11):
``import client`` loads no framework and no torch, each adapter imports only its own
framework, one framework missing never hides another's adapter, and the
subpackage ships in the wheel.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT

FRAMEWORKS = ("torch", "lightning", "pytorch_lightning", "transformers", "accelerate")
ADAPTERS = {  # adapter module -> its framework
    "client.integrations.lightning": "lightning",
    "client.integrations.transformers": "transformers",
    "client.integrations.accelerate": "accelerate",
}


def _python(code: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_client_imports_no_framework():
    loaded = _python(
        "import json, sys\n"
        "import client, client.integrations\n"
        f"print(json.dumps(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)))\n"
    )
    assert loaded == []


@pytest.mark.parametrize("module", sorted(ADAPTERS) + ["client.integrations._common"])
def test_each_adapter_imports_only_its_own_framework(module):
    framework = ADAPTERS.get(module)  # _common, shared by the adapters: no framework at all
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    imported = set()
    for node in ast.walk(tree):  # every import, at the top or inside a function
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    allowed = {"lightning", "pytorch_lightning"} if framework == "lightning" else {framework} - {None}
    assert third_party <= allowed and bool(third_party) == bool(framework), f"{module} imports {sorted(third_party)}"


def test_one_framework_missing_hides_no_other_adapter():
    # Lightning missing (both packages): its adapter raises ImportError, and the client
    # and the other adapters import as before.
    have = [m for m in ("transformers", "accelerate") if importlib.util.find_spec(m) is not None]
    out = _python(
        "import importlib, json, sys\n"
        "sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
        "import client\n"
        "try:\n"
        "    import client.integrations.lightning\n"
        "    err = None\n"
        "except ImportError as exc:\n"
        "    err = 'ImportError'\n"
        f"others = [importlib.import_module('client.integrations.' + m).__all__[0] for m in {have!r}]\n"
        "print(json.dumps({'err': err, 'client': hasattr(client, 'MetricsClient'), 'others': others}))\n"
    )
    names = {"transformers": "SidecarCallback", "accelerate": "SidecarTracker"}
    assert out == {"err": "ImportError", "client": True, "others": [names[m] for m in have]}


def test_the_integrations_subpackage_ships_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]
    on_disk = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "client").rglob("__init__.py")}
    assert on_disk == {"client", "client.integrations"}
    assert on_disk <= set(packages)
    # the frameworks are a pinned test extra, never dependencies of the client
    deps = {re.split(r"[=<>!~ \[]", d)[0] for d in pyproject["project"]["dependencies"]}
    assert not deps & {"lightning", "pytorch-lightning", "transformers", "accelerate", "torch"}
    frameworks = pyproject["project"]["optional-dependencies"]["frameworks"]
    assert {d.split("==")[0] for d in frameworks} == {"lightning", "transformers", "accelerate"}
