"""Decide, in a few seconds, whether timm can fetch pretrained weights.

huggingface_hub retries an unreachable host for about a minute before it gives up
(measured: 46 s for resnet18 here). We probe the host once with a short timeout instead and,
when it cannot be reached, fall back to the local HF cache or fail with a one-line error.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import timm

from finetune.errors import FinetuneError


class PretrainedWeightsUnavailable(FinetuneError, RuntimeError):
    """The hub cannot be reached and the weights are not in the local cache: the message is
    the user's one line (`finetune` prints it without a traceback)."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def host_reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def cached_weights_file(hf_hub_id: str) -> str | None:
    """Path of weights already in the local Hugging Face cache, if any."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = hf_hub_id.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        if isinstance(path, str):
            return path
    return None


def hub_offline_reason(url: str | None = None) -> str | None:
    """Why the Hub (or `url`, default the Hub's endpoint) cannot be used now, or None.
    Behind a proxy a direct socket probe says nothing useful: trust the libraries then."""
    if _env_true("HF_HUB_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    url = url or _hub_endpoint()
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if proxied or host_reachable(url):
        return None
    return f"{urlparse(url).hostname} is unreachable"


def pretrained_overlay(model_name: str) -> dict:
    """Extra `timm.create_model` kwargs that make `pretrained=True` work without retries.

    Returns {} when the hub is reachable (timm downloads and caches as usual), a
    `pretrained_cfg_overlay` pointing at the cached file when it is not, and raises
    `PretrainedWeightsUnavailable` when neither works.
    """
    cfg = timm.get_pretrained_cfg(model_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise PretrainedWeightsUnavailable(
            f"model.pretrained: {model_name} has no pretrained weights in timm; set model.pretrained: false "
            "or pass a local file with model.weights: PATH"
        )
    if cfg.file:
        return {}
    where = hub_offline_reason(None if cfg.hf_hub_id else cfg.url)
    if where is None:
        return {}
    cached = cached_weights_file(cfg.hf_hub_id) if cfg.hf_hub_id else None
    if cached:
        return {"pretrained_cfg_overlay": {"file": cached}}
    raise PretrainedWeightsUnavailable(
        f"model.pretrained: weights for {model_name} are not cached and {where}; pass a local file with "
        f"`--model.weights /path/to/{model_name.split('.')[0]}.safetensors` (.pth/.ckpt work too) "
        "or train from scratch with `--model.pretrained false`"
    )
