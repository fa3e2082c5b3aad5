"""The export's ``README.md`` model card: what was trained, on what, how, and how it went.

The settings come from the run's own config and the metrics from the studio's database, so the card names
what really happened. The loss curve is drawn as ``loss_curve.png`` when matplotlib is installed (it is not
a dependency); otherwise the card says so and lists the curve's values.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

from finetune_studio.core.store import Store
from finetune_studio.engine.models import is_full_model_folder

SETTINGS = (
    "method",
    "objective",
    "max_steps",
    "num_epochs",
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "target_modules",
    "optimizer",
    "weight_decay",
    "max_grad_norm",
    "compute_dtype",
    "loss_on",
    "seed",
    "dpo_beta",
    "dpo_loss",
)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _metrics(run_id: str, up_to: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    if not run_id:
        return [], []
    store = Store()
    try:
        train = [(m["step"], m["loss"]) for m in store.metrics(run_id, "train") if m.get("loss") is not None]
        evals = [(m["step"], m["eval_loss"]) for m in store.metrics(run_id, "eval") if m.get("eval_loss") is not None]
    finally:
        store.close()
    return [p for p in train if p[0] <= up_to], [p for p in evals if p[0] <= up_to]


def _draw(train, evals, path: Path) -> bool:
    if importlib.util.find_spec("matplotlib") is None or not train:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _dataset_line(spec: str) -> str:
    if not spec:
        return "(none recorded)"
    path = Path(spec)
    if path.is_file():
        return f"`{path.name}` ({path.stat().st_size} bytes, sha256 `{file_sha256(path)}`, hashed at export time)"
    if path.is_dir():
        return f"`{path.name}` (a folder; not hashed)"
    return f"`{spec}` (not found at export time, so not hashed)"


def _run_lines(formats, quants, dtype: str, merge: dict | None, modelfiles) -> list[str]:
    """How to run each written form: the merged model with transformers, GGUF with llama.cpp, Ollama."""
    lines: list[str] = []
    if "merged" in formats:
        lines += [
            "",
            f"### Merged model (`merged/`, {dtype})",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder/merged")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder/merged")',
            "```",
        ]
        if merge:
            kept = merge["kept"]
            lines += [
                "",
                f"Stored in {dtype}{' (chosen by the export)' if merge['requested'] == 'auto' else ''}: it keeps the "
                f"training update in {kept[dtype]:.1%} of the {merge['changed_elements']} weights the adapter changed "
                f"(float16 would keep {kept['float16']:.1%}, bfloat16 {kept['bfloat16']:.1%}). `check.json` has "
                "the figure for every layer.",
            ]
    if "gguf" in formats:
        lines += [
            "",
            f"### GGUF (`gguf/`: {', '.join(quants)})",
            "",
            "With llama.cpp: `llama-cli -m gguf/<file>.gguf -cnv` (the chat template and the end-of-turn token are "
            "in the file).",
        ]
    if modelfiles:
        lines += ["", "### Ollama", "", "```sh", "cd gguf"]
        for name in modelfiles:
            lines.append(
                f"ollama create my-model{'' if name == 'Modelfile' else '-' + name.split('.', 1)[1]} -f {name}"
            )
        lines += ["ollama run my-model", "```", ""]
        lines.append(
            "Each Modelfile names its GGUF file (" + ", ".join(f"`{n}`" for n in modelfiles) + "); choose any name "
            "instead of `my-model`."
        )
    return lines


def write_card(
    folder: Path, source, base_folder: Path, formats, quants, dtype: str, *, merge: dict | None = None, modelfiles=()
) -> str:
    """Write README.md (and loss_curve.png when possible) into ``folder``; returns a note for the report."""
    cfg = source.config
    full = is_full_model_folder(source.folder)  # a full fine-tune: the model itself, loaded without PEFT
    train, evals = _metrics(source.run_id, source.step)
    drew = _draw(train, evals, folder / "loss_curve.png")
    best = min(evals, key=lambda p: p[1]) if evals else None
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {cfg.get('model', '')}",
        "tags: [finetune-studio, lora]",
        "---",
        "",
        f"# {source.run.get('name') or source.run_id or 'Fine-tuned adapter'}",
        "",
        (
            f"A model fine-tuned in full (every weight trained, no adapter) with {cfg.get('objective', 'sft').upper()} "
            "by Finetune Studio"
            if full
            else f"A {cfg.get('method', 'lora').upper()} adapter trained with {cfg.get('objective', 'sft').upper()} by "
            "Finetune Studio"
        )
        + f", exported from {'the final adapter' if source.label == 'final' else source.label}.",
        "",
        "| | |",
        "|---|---|",
        f"| Base model | `{cfg.get('model', '')}` (loaded from `{base_folder}`) |",
        f"| Method | {cfg.get('method', '')} |",
        f"| Objective | {cfg.get('objective', '')} |",
        f"| Dataset | {_dataset_line(cfg.get('dataset', ''))} |",
        f"| Steps | {source.step} of {source.run.get('total_steps') or cfg.get('max_steps')} |",
        f"| Final train loss | {train[-1][1]:.4f} (step {train[-1][0]}) |" if train else "| Final train loss | - |",
        f"| Final eval loss | {evals[-1][1]:.4f} (step {evals[-1][0]}) |" if evals else "| Final eval loss | - |",
        f"| Best eval loss | {best[1]:.4f} (step {best[0]}) |" if best else "| Best eval loss | - |",
        f"| Run id | `{source.run_id}` |",
        f"| Formats | {', '.join(formats)}{' (' + ', '.join(quants) + ')' if 'gguf' in formats else ''} |",
        f"| Engine | finetune-studio {_version('finetune-studio')}, torch {_version('torch')}, "
        f"transformers {_version('transformers')}, peft {_version('peft')} |",
        "",
        "## Hyper-parameters",
        "",
        "| Setting | Value |",
        "|---|---|",
    ]
    lines += [f"| {k} | `{cfg[k]}` |" for k in SETTINGS if k in cfg]
    lines += ["", "## Loss curve", ""]
    if drew:
        lines.append("![loss curve](loss_curve.png)")
        note = ""
    else:
        note = "no loss-curve picture: matplotlib is not installed (pip install matplotlib to get one)"
        lines.append(f"(No picture: {note.split(': ', 1)[1]}.)")
        if train:
            every = max(1, len(train) // 20)
            lines += ["", "| Step | Train loss |", "|---|---|"]
            lines += [f"| {s} | {v:.4f} |" for s, v in train[::every]]
    bottleneck_adapter = (folder / "bottleneck_config.json").is_file()  # engine.bottleneck's saved form
    loader = (
        ["from finetune_studio.engine.bottleneck import load_bottlenecks"]
        if bottleneck_adapter
        else ["from peft import PeftModel"]
    )
    load = (
        'model = load_bottlenecks(base, "path/to/this/folder")  # bottleneck_config.json says the format'
        if bottleneck_adapter
        else 'model = PeftModel.from_pretrained(base, "path/to/this/folder")'
    )
    use = [f'base = AutoModelForCausalLM.from_pretrained("{base_folder}")', load]
    if full:
        loader = []
        use = ['model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")  # the whole model']
    lines += [
        "",
        "## Use",
        "",
        "```python",
        *loader,
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        *use,
        "```",
    ]
    lines += _run_lines(formats, quants, dtype, merge, modelfiles)
    lines += [
        "",
        "`check.json` holds the result of the check made after writing: each form reloaded in a fresh process "
        "(GGUF through llama.cpp when llama-cpp-python is installed) and compared with the trained model on the "
        "run's validation prompts: next-token agreement at every position and the greedy answers.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")
    return note
