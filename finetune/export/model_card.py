"""The model card (README.md) of a Hub folder: timm's front matter and sections (generate_readme),
then what a user of the model needs: classes, metrics measured at export, the training config,
how to load it, intended use and limits."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from finetune.export.metadata import plain

PIPELINE_TAGS = {
    "classification": "image-classification",
    "multilabel_classification": "image-classification",
    "segmentation": "image-segmentation",
    "embedding": "image-feature-extraction",
}
LISTED_CLASSES = 200  # more are in config.json


def training_record(ckpt_path: str | Path, monitor: str) -> dict:
    """Epoch, step and the monitored best score (Lightning's ModelCheckpoint state), where stored."""
    import torch

    raw = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    record = {"epoch": raw.get("epoch"), "global_step": raw.get("global_step")}
    states = [s for key, s in (raw.get("callbacks") or {}).items() if str(key).startswith("ModelCheckpoint")]
    scored = [s for s in states if isinstance(s, dict) and s.get("best_model_score") is not None]
    scored.sort(key=lambda s: s.get("monitor") != monitor)  # the task's own monitor first
    if scored:
        record.update(monitor=scored[0].get("monitor") or monitor, best_score=float(scored[0]["best_model_score"]))
    return record


def _count_images(folder: Path) -> int:
    """Images under `folder`, mask folders left out (segmentation keeps masks beside images)."""
    from finetune.data.folder import list_image_paths

    return sum(1 for p in list_image_paths(folder) if "masks" not in Path(p).relative_to(folder).parts)


def data_summary(loaded) -> str:
    """Where the training data was, with train/val image counts when it is a split folder still there."""
    data = loaded.data
    if data.get("manifest"):
        return f"manifest {data['manifest']}"
    root = data.get("root")
    if not root:
        return "not recorded in the checkpoint"
    path = Path(root).expanduser()
    if (path / "train").is_dir() and (path / "val").is_dir():
        return f"{_count_images(path / 'train')} train and {_count_images(path / 'val')} val images in {root}"
    return f"images in {root}"


def _preprocessing_line(prep: dict) -> str:
    norm = f"mean {prep['mean']}, std {prep['std']} (of pixel / 255)"
    if prep.get("input_size") is None:
        return f"RGB at the image's own size; normalised with {norm}"
    size = prep["input_size"][-1]
    if prep.get("resize_mode") == "squash":
        return f"RGB resized to {size}x{size} ({prep['interpolation']}, aspect not kept); normalised with {norm}"
    return (f"RGB, shorter side resized to {size} / crop_pct {prep['crop_pct']} ({prep['interpolation']}), "
            f"centre crop {size}x{size}; normalised with {norm}")


def _classes_section(loaded, block: dict) -> str:
    if "embedding_dim" in block:
        return (f"Trained on {len(loaded.class_names)} identities; the model outputs {block['embedding_dim']}-d "
                "unit-norm embeddings, not classes.\n")
    names = loaded.class_names
    lines = [f"{i}. {name}" for i, name in enumerate(names[:LISTED_CLASSES])]
    if len(names) > LISTED_CLASSES:
        lines.append(f"... and {len(names) - LISTED_CLASSES} more (config.json's `label_names`)")
    return f"{len(names)} classes, by output index:\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"


def _usage(hub, block: dict, source: str, repo_id: str | None) -> str:
    fetch = (f'folder = snapshot_download("{repo_id}")' if repo_id else f'folder = "{hub.folder}"')
    ours = (
        "```python\n"
        + ("from huggingface_hub import snapshot_download\n" if repo_id else "")
        + "from finetune.export.hub import load_hub_folder\n\n"
        + f"{fetch}\n"
        + "network = load_hub_folder(folder)  # finetune's network, eval mode\n"
        + "outputs = network.predict(images)  # images: float [N, 3, H, W], normalised as below\n"
        + f"# outputs: {', '.join(block['outputs'])}\n"
        + "```\n"
    )
    if hub.timm_gives is None:
        return ours
    activation = block.get("activation", "softmax")
    call = "logits.softmax(dim=-1)" if activation == "softmax" else "logits.sigmoid()  # one probability per label"
    timm_code = (
        "```python\n"
        "import timm\n"
        "import torch\n"
        "from PIL import Image\n\n"
        f'model = timm.create_model("{source}", pretrained=True).eval()\n'
        "config = timm.data.resolve_data_config(model=model)\n"
        "transform = timm.data.create_transform(**config)\n"
        "with torch.inference_mode():\n"
        '    logits = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0))\n'
        f"probabilities = {call}\n"
        "```\n"
    )
    if hub.loader == "timm":
        return f"With timm (gives {hub.timm_gives}):\n\n{timm_code}\nOr with finetune:\n\n{ours}"
    return (f"timm gives {hub.timm_gives}, not the fine-tuned network ({hub.fallback}):\n\n{timm_code}\n"
            f"The fine-tuned network needs finetune:\n\n{ours}")


def _limits(loaded, hub, block: dict, data: str) -> list[str]:
    name = loaded.contract.name
    limits = [
        f"Fine-tuned on {data}: it knows what those images show. Check it on images from where you will use it "
        "before relying on it; it was not evaluated for fairness or safety.",
        "Preprocess as in training (see Model Details). timm's `create_transform` does the same resize, crop and "
        "normalisation with PIL where training used OpenCV, so probabilities can differ slightly.",
    ]
    if name == "classification":
        limits.append(f"It always answers one of its {len(loaded.class_names)} classes (softmax), also for an image "
                      "of none of them; probabilities are not calibrated.")
    elif name == "multilabel_classification":
        limits.append("A sigmoid per label: each label's probability stands on its own (they need not sum to 1); a "
                      f"label is present at or above its threshold: {block.get('thresholds')}.")
    elif name == "segmentation":
        limits.append(f"A class per pixel, at the image's own size; image sides must be at least "
                      f"{block.get('min_input_size')} px.")
    elif name == "embedding":
        limits.append("Compare embeddings by cosine similarity (a dot product: they are unit-norm); choose the match "
                      "threshold on your own data. It does not classify.")
    if hub.fallback:
        limits.append(f"timm's `create_model` does not give this network ({hub.fallback}); "
                      "`finetune.export.hub.load_hub_folder` does.")
    return limits


def default_license(backbone: str) -> str:
    """The license timm gives the backbone's pretrained weights (fine-tuning derives from them), else other."""
    import timm

    cfg = timm.get_pretrained_cfg(backbone)
    return (cfg.license if cfg and cfg.license else "other").lower()


def model_card(loaded, hub, report, record: dict, license: str, repo_id: str | None = None) -> str:
    """README.md text. `hub`: finetune.export.hub.HubFolder; `report`: the export's ParityReport;
    `record`: training_record()."""
    from timm.models._hub import generate_readme

    block = hub.block

    name, backbone = loaded.contract.name, loaded.hparams["backbone"]
    pipeline = PIPELINE_TAGS.get(name, "image-classification")
    source = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{os.fspath(hub.folder)}"
    data = data_summary(loaded)
    metrics = [report.summary()]
    if "best_score" in record:
        metrics.append(f"{record['monitor']} of the best checkpoint (Lightning's ModelCheckpoint): {record['best_score']:.4f}")
    metrics.append(f"exported from epoch {record.get('epoch')}, step {record.get('global_step')}")
    details = {
        "Task": name + (" (a sigmoid per label)" if block.get("activation") == "sigmoid" else ""),
        "Backbone": f"timm {backbone}",
        "Head": _head(loaded),
        "Classes": len(loaded.class_names),
        "Input": _preprocessing_line(loaded.preprocessing.to_dict()),
        "Data": data,
        "Loads with": (f"timm.create_model(\"{source}\", pretrained=True)" if hub.loader == "timm"
                       else "finetune.export.hub.load_hub_folder(folder)"),
    }
    card = {
        "tags": [pipeline, "timm", "finetune"] + (["multi-label-classification"] if block.get("activation") == "sigmoid" else []),
        "library_name": "timm" if hub.timm_gives else "finetune",
        "license": license,
        "description": f"A {name} model fine-tuned with finetune (PyTorch Lightning) from timm's `{backbone}`.",
        "details": details,
        "usage": _usage(hub, block, source, repo_id),
    }
    title = repo_id.split("/")[-1] if repo_id else hub.folder.name
    text = generate_readme(card, title, task_name=pipeline)
    config = yaml.safe_dump(plain(loaded.config), sort_keys=False)
    text += "\n## Classes\n\n" + _classes_section(loaded, block)
    text += "\n## Metrics measured at export\n\n" + "".join(f"- {line}\n" for line in metrics)
    text += f"\n## Training config\n\nThe model and data config of the run (`finetune fit`):\n\n```yaml\n{config}```\n"
    text += "\n## Intended use and limits\n\n" + "".join(f"- {line}\n" for line in _limits(loaded, hub, block, data))
    return text


def _head(loaded) -> str:
    hp = loaded.hparams
    if "pool" not in hp:
        return loaded.contract.network.__name__
    hidden = f" -> linear {hp['hidden_dim']} + BatchNorm + ReLU" if hp.get("hidden_dim") else ""
    tta = " (test-time augmentation averaged)" if hp.get("tta_flip") or (hp.get("tta_scales") or [1.0]) != [1.0] else ""
    return f"{hp['pool']} pool{hidden} -> linear {hp['num_classes']}{tta}"
