"""The move of issue 19 (rooms inside the rooms): ``git mv`` by a mapping table, then every import rewritten.

Run once from the repository root on the commit before the move; kept as the record of what moved where.
Move only: no logic changes (paths computed from ``__file__`` follow their file's new depth).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

# old module (under finetune_studio) -> new module
MODULES = {
    # engine: the command line
    "engine.cli": "engine.cli.commands",
    "engine.argparsing": "engine.cli.argparsing",
    "engine.data_cli": "engine.cli.data",
    "engine.db_cli": "engine.cli.db",
    "engine.devices_cli": "engine.cli.devices",
    "engine.estimate_cli": "engine.cli.estimate",
    "engine.export_cli": "engine.cli.export",
    "engine.pairs_cli": "engine.cli.pairs",
    "engine.runs_cli": "engine.cli.runs",
    "engine.slurm": "engine.cli.slurm",
    # engine: training
    "engine.train": "engine.train.recipe",
    "engine.batches": "engine.train.batches",
    "engine.forward": "engine.train.forward",
    "engine.losses": "engine.train.losses",
    "engine.adapters": "engine.train.adapters",
    "engine.init_adapter": "engine.train.init_adapter",
    "engine.early_stopping": "engine.train.early_stopping",
    "engine.samples": "engine.train.eval_samples",
    "engine.guard": "engine.train.guard",
    "engine.errors": "engine.train.errors",
    "engine.reporting": "engine.train.reporting",
    "engine.memory_budget": "engine.train.memory_budget",
    "engine.threads": "engine.train.threads",
    "engine.saved_tensors": "engine.train.saved_tensors",
    "engine.mixed_precision": "engine.train.model_patches.mixed_precision",
    "engine.patching": "engine.train.model_patches.fused_ops",
    "engine.kernel_wiring": "engine.train.model_patches.kernel_wiring",
    "engine.distributed": "engine.train.distributed.ranks",
    "engine.dist_checkpoint": "engine.train.distributed.checkpoint",
    "engine.launch": "engine.train.distributed.launch",
    # engine: generation
    "engine.generation": "engine.generate.generator",
    "engine.serve": "engine.generate.serve",
    "engine.decode": "engine.generate.decode",
    "engine.sampling": "engine.generate.token_sampling",
    "engine.int8": "engine.generate.int8",
    "engine.int4": "engine.generate.int4",
    # engine: export
    "engine.export": "engine.export.writer",
    "engine.export_build": "engine.export.build",
    "engine.export_card": "engine.export.card",
    "engine.export_check": "engine.export.check",
    "engine.export_gguf": "engine.export.gguf",
    "engine.export_ollama": "engine.export.ollama",
    # engine: the demo task
    "engine.demo": "engine.demo.task",
    "engine.demo_loop": "engine.demo.loop",
    # engine: data
    "engine.render": "engine.datasets.render",
    "engine.pairs": "engine.datasets.pairs",
    # core: what crosses a process boundary
    "core.events": "core.protocol.events",
    "core.dataset_report": "core.protocol.dataset_report",
    "core.device_report": "core.protocol.device_report",
    "core.memory_report": "core.protocol.memory_report",
    "core.generation": "core.protocol.generation",
    "core.generation_client": "core.protocol.generation_client",
    # core: the memory estimate
    "core.memory": "core.memory.estimate",
    "core.memory_parallel": "core.memory.parallel",
    # studio: Qt-free state
    "core.annotation": "studio.state.annotation",
    "studio.state": "studio.state.run",
    "studio.setup_state": "studio.state.setup",
    "studio.observable": "studio.state.observable",
    "studio.series": "studio.state.series",
    "studio.settings": "studio.state.settings",
    "studio.presets": "studio.state.presets",
    "studio.model_info": "studio.state.model_info",
    "studio.estimate": "studio.state.estimate",
    # studio: processes and jobs
    "studio.engine_process": "studio.services.engine_process",
    "studio.generation_worker": "studio.services.generation_worker",
    "studio.jobs": "studio.services.jobs",
    "studio.relay": "studio.services.relay",
    "studio.run_controller": "studio.services.run_controller",
    "studio.annotation_generation": "studio.services.annotation_generation",
    # studio: pages and widgets
    "studio.pages.annotate_page": "studio.pages.annotate.page",
    "studio.runs_model": "studio.widgets.runs_model",
}

# Tests grouped by room (their own names unchanged).
TEST_ROOMS = {
    "core": [
        "test_config",
        "test_dataset_report",
        "test_events_store",
        "test_generation_protocol",
        "test_memory",
        "test_memory_devices",
        "test_model_spec",
        "test_preferences_store",
        "test_process_env",
        "test_run_status",
    ],
    "kernels": [
        "test_kernels_dora_norm",
        "test_kernels_dora_output",
        "test_kernels_fused_ops",
        "test_kernels_linear_logprobs",
        "test_kernels_triton",
    ],
    "contracts": ["test_studio_imports", "test_namespace_and_logs"],
}
NEW_PACKAGES = [
    "engine/cli",
    "engine/train",
    "engine/train/model_patches",
    "engine/train/distributed",
    "engine/generate",
    "engine/export",
    "engine/demo",
    "core/protocol",
    "core/memory",
    "studio/state",
    "studio/services",
    "studio/pages/annotate",
]


def module_file(mod: str) -> Path:
    return Path(*mod.split(".")).with_suffix(".py")


def git(*args: str) -> None:
    subprocess.run(["git", *args], check=True)


def move_files() -> dict[str, str]:
    """git mv every module; a module whose name becomes a package moves through a temporary name."""
    paths: dict[str, str] = {}
    staged = []
    for old, new in MODULES.items():
        src, dst = module_file(old), module_file(new)
        tmp = src.with_name(f"_moving_{src.name}")
        git("mv", str(src), str(tmp))
        staged.append((tmp, dst))
        paths[str(src)] = str(dst)
    for pkg in NEW_PACKAGES:
        Path(pkg).mkdir(parents=True, exist_ok=True)
    for tmp, dst in staged:
        dst.parent.mkdir(parents=True, exist_ok=True)
        git("mv", str(tmp), str(dst))
    for pkg in NEW_PACKAGES:
        init = Path(pkg) / "__init__.py"
        if not init.exists():
            init.write_text(f'"""{pkg}."""\n')
            git("add", str(init))
    tests = Path("tests")
    for room, names in TEST_ROOMS.items():
        (tests / room).mkdir(exist_ok=True)
        for name in names:
            git("mv", f"tests/{name}.py", f"tests/{room}/{name}.py")
            paths[f"tests/{name}.py"] = f"tests/{room}/{name}.py"
    for f in sorted(tests.glob("test_*.py")):
        room = "studio" if f.name.startswith(("test_studio", "test_robust_studio", "test_annotation")) else "engine"
        (tests / room).mkdir(exist_ok=True)
        git("mv", str(f), f"tests/{room}/{f.name}")
        paths[str(f)] = f"tests/{room}/{f.name}"
    return paths


DOTTED = re.compile(
    r"(?<![\w.])(finetune_studio\.)?("
    + "|".join(re.escape(m) for m in sorted(MODULES, key=len, reverse=True))
    + r")(?![\w])"
)


def rewrite_dotted(text: str, short_forms: bool) -> str:
    def sub(m: re.Match) -> str:
        if not m.group(1) and not short_forms:
            return m.group(0)
        return (m.group(1) or "") + MODULES[m.group(2)]

    return DOTTED.sub(sub, text)


def rewrite_from_imports(text: str) -> str:
    """``from finetune_studio.engine import train, models`` -> one statement per moved module, names kept."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    edits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("finetune_studio."):
            continue
        parent = node.module.removeprefix("finetune_studio.")
        moved = [a for a in node.names if f"{parent}.{a.name}" in MODULES]
        if not moved:
            continue
        first, last = node.lineno - 1, node.end_lineno - 1
        indent = lines[first][: node.col_offset]
        tail = lines[last][node.end_col_offset :].rstrip("\n")
        out = []
        kept = [a for a in node.names if a not in moved]
        if kept:
            names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in kept)
            out.append(f"{indent}from {node.module} import {names}{tail}\n")
        for a in moved:
            new = MODULES[f"{parent}.{a.name}"]
            pkg, _, leaf = new.rpartition(".")
            local = a.asname or a.name
            alias = "" if leaf == local else f" as {local}"
            out.append(f"{indent}from finetune_studio.{pkg} import {leaf}{alias}{tail}\n")
        edits.append((first, last, out))
    for first, last, out in sorted(edits, reverse=True):
        lines[first : last + 1] = out
    return "".join(lines)


def rewrite_paths(text: str, paths: dict[str, str]) -> str:
    keys = sorted(paths, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w/.])(" + "|".join(re.escape(k) for k in keys) + r")(?![\w])")
    return pattern.sub(lambda m: paths[m.group(1)], text)


def main() -> int:
    paths = move_files()
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        f = Path(name)
        if f.suffix not in {".py", ".md", ".toml", ".sh", ".yaml", ".cfg", ".txt"} or f.parts[:2] == ("docs", "moves"):
            continue
        text = f.read_text()
        new = text
        new = rewrite_dotted(new, short_forms=f.suffix in {".py", ".md"})
        if f.suffix == ".py":
            new = rewrite_from_imports(new)
        new = rewrite_paths(new, paths)
        if new != text:
            f.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
