"""The layout's contracts: imports flow one way, built-ins register as plugins, and a third-party package can
add an attack and a check that show up in `list` and on a board without editing ours."""
import ast
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from harness.registry import ATTACKS, BUILTIN_PLUGINS, PLUGIN_GROUP

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "attacks_ext", "defenses")

# Lowest first. A module may import its own layer and the ones below, never one above.
FOUNDATION = {"harness", "harness.registry", "harness.threat", "harness.data", "harness.models", "harness.counting", "harness.statistics",
              "harness.figures", "harness.provenance", "harness.records", "harness.check_types", "attacks_ext.base"}
LAYERS = ("foundation", "attacks", "defenses", "runner")


def layer_of(module: str) -> int:
    if module in FOUNDATION:
        return 0
    top = module.split(".")[0]
    return {"attacks_ext": 1, "defenses": 2, "harness": 3}[top]


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Every module of our packages -> the modules of ours it imports (anywhere in the file, functions included)."""
    graph = {}
    for path in sorted(p for package in PACKAGES for p in (root / package).rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            imported |= {n for n in names if n.split(".")[0] in PACKAGES}
        graph[module] = imported
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} ({LAYERS[layer_of(module)]}) imports {target} ({LAYERS[layer_of(target)]})"
                  for module, targets in graph.items() for target in targets if layer_of(target) > layer_of(module))


def test_no_module_imports_a_layer_above_its_own():
    graph = import_graph()
    assert {"harness.registry", "attacks_ext.pgd", "defenses.train", "harness.matrix"} <= set(graph)
    assert violations(graph) == []


def test_the_layering_test_catches_an_upward_import():
    graph = import_graph()
    graph["harness.threat"] = graph["harness.threat"] | {"harness.store"}
    graph["attacks_ext.pgd"] = graph["attacks_ext.pgd"] | {"defenses.train"}
    assert violations(graph) == ["attacks_ext.pgd (attacks) imports defenses.train (defenses)",
                                 "harness.threat (foundation) imports harness.store (runner)"]


def test_training_code_imports_no_store_checks_or_plotting():
    """Importing the training loop (and an attack) pulls in nothing of the runner, the checks or matplotlib."""
    code = ("import sys, defenses.train, attacks_ext.pgd; "
            "print(sorted(m for m in sys.modules if m.startswith(('harness.store', 'harness.matrix', 'attacks_ext.checks', "
            "'matplotlib'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_pyproject_declares_the_built_in_plugins():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][PLUGIN_GROUP]
    assert declared == BUILTIN_PLUGINS


@pytest.mark.parametrize("attack_id", list(ATTACKS))
def test_attack_metadata_is_what_the_attack_is(attack_id):
    """`list` and the checks read metadata without building the attack; it must describe the built one."""
    info, attack = ATTACKS.info(attack_id), ATTACKS.get(attack_id)()
    assert (info["norm"], info["family"].value, info["uses_true_label"]) == (
        attack.norm, attack.family, attack.uses_true_label)
    assert info["library"] == getattr(attack, "library", "ours")


PLUGIN = '''
"""A third-party plugin: one attack and one check, registered on import."""
import torch

from harness.check_types import Check, Status
from harness.registry import ATTACKS, CHECKS
from attacks_ext.base import Attack


class Brighten(Attack):
    def run(self, model, x, y, *, eps, rng, stop_when_fooled=False):
        return (x + eps).clamp(0, 1)


@ATTACKS.register("toy-brighten", norm="linf", family="noise", library="toy-plugin", uses_true_label=False)
def toy_brighten():
    """Adds eps to every pixel (a plugin's attack)."""
    return Brighten("toy-brighten", "linf", uses_true_label=False, family="noise")


@CHECKS.register("toy-check")
class ToyCheck(Check):
    """Passes when the clean evaluation is stored (a plugin's check)."""
    id, title = "toy-check", "Toy plugin check"

    def evaluate(self, evidence):
        status = Status.PASS if evidence.clean is not None else None
        return self._verdict(status, "clean stored", "the plugin ran")
'''

BOARD = '''
[benchmark]
name = "plugin-board"
dataset = "mnist5k"
eval_examples = 30
batch_size = 30

[eps]
linf = [0.1]

[defenses.natural]
recipe = "natural"
epochs = 1

[attacks.brighten]
attack = "toy-brighten"

[checks.toy-check]
'''


def test_a_plugin_package_adds_an_attack_and_a_check(tmp_path):
    site = tmp_path / "site"
    (site / "toy_plugin").mkdir(parents=True)
    (site / "toy_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    meta = site / "toy_plugin-0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (meta / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\ntoy = toy_plugin\n")
    board = tmp_path / "plugin-board.toml"
    board.write_text(BOARD)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HARNESS_HOME": str(tmp_path / "home")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "harness", *args], cwd=tmp_path, capture_output=True, text=True,
                              env=env)

    listed = cli("list", "attacks").stdout
    assert "toy-brighten" in listed and "[linf, noise, toy-plugin]" in listed
    assert "toy-check" in cli("list", "checks").stdout
    run = cli("run", str(board), "--out", str(tmp_path / "boards"), "--no-progress")
    assert run.returncode == 0, run.stderr
    ranking = (tmp_path / "boards" / "plugin-board.md").read_text()
    sanity = (tmp_path / "boards" / "plugin-board-sanity.md").read_text()
    assert "brighten" in ranking and "toy-check" in sanity


def test_a_broken_plugin_is_named_without_a_traceback(tmp_path):
    (tmp_path / "broken_plugin").mkdir()
    (tmp_path / "broken_plugin" / "__init__.py").write_text("raise ImportError('needs a library it lacks')\n")
    meta = tmp_path / "broken_plugin-0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (meta / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\nbroken = broken_plugin\n")
    result = subprocess.run([sys.executable, "-m", "harness", "list", "attacks"], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "plugin 'broken' of package 'broken-plugin'" in result.stderr and "needs a library it lacks" in result.stderr


def test_regenerated_boards_leave_the_commit_clean(tmp_path):
    """A board rewritten in place does not mark the code dirty; an edited source file does."""
    from harness.provenance import code_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "leaderboards").mkdir()
    (tmp_path / "leaderboards" / "b.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    clean = code_commit(tmp_path)
    assert len(clean) == 12 and not clean.endswith("-dirty")
    (tmp_path / "leaderboards" / "b.md").write_text("regenerated\n")
    assert code_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert code_commit(tmp_path) == clean + "-dirty"
