"""Integrations with serving stacks.

* :mod:`openlora_kernels.integrations.vllm`: a vLLM punica wrapper on our kernels
  (``PunicaWrapperOpenLoRA``), switched on by :func:`vllm_plugin` (the ``vllm.general_plugins``
  entry point, inert unless ``OPENLORA_VLLM=1``) or by ``openlora_kernels.integrations.vllm.enable()``.
  See docs/integrations.md.

Importing this package imports nothing of vLLM (nor the integration module): the entry point below
reads one environment variable and returns when it is not set.
"""
from __future__ import annotations

import os

VLLM_ENABLE_ENV = "OPENLORA_VLLM"
_TRUE = ("1", "true", "yes", "on")


def vllm_plugin() -> None:
    """The ``vllm.general_plugins`` entry point (vLLM calls it in every process it starts).

    Does nothing unless ``OPENLORA_VLLM=1`` is set, so that installing openlora_kernels never
    changes vLLM by surprise; with it, calls :func:`openlora_kernels.integrations.vllm.enable`,
    which raises a clear error on a vLLM version we do not support.
    """
    if os.environ.get(VLLM_ENABLE_ENV, "").strip().lower() not in _TRUE:
        return
    from .vllm import enable

    enable()


__all__ = ["vllm_plugin", "VLLM_ENABLE_ENV"]
