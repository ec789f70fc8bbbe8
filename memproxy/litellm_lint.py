"""What memproxy checks in LiteLLM's own sections of the config: where the memory headers go.

The memory user id and the Supermemory key belong to the models that go through
Supermemory's memory router: there they must arrive, and no other provider
should get them. LiteLLM decides that (header forwarding, per-model extra
headers), so ``check-config`` and start-up read LiteLLM's sections and warn
about layouts that would lose the headers or leak them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from memproxy.config import OWN_MEMORY_BACKENDS, Settings
from memproxy.config_checks import resolve_env

#: The memory router's address form: ``/v3/`` then the provider's host (``/v3/api.anthropic.com``).
_ROUTER_PATH = re.compile(r"/v3/[a-z0-9-]+(?:\.[a-z0-9-]+)+(?:/|$)", re.IGNORECASE)


def goes_through_supermemory(api_base: Any) -> bool:
    """Whether a model with this ``litellm_params.api_base`` reaches Supermemory's memory router.

    The router is addressed as ``https://api.supermemory.ai/v3/<provider host>``. An
    address naming Supermemory counts, and so does any address of the ``/v3/<provider
    host>`` form, since a self-hosted router or a local stand-in has a host of its own.
    """
    value = resolve_env(api_base)
    if not isinstance(value, str):
        return False
    if "supermemory" in value.lower():
        return True
    try:
        path = urlsplit(value).path
    except ValueError:
        return False
    return _ROUTER_PATH.match(path) is not None


def lint(settings: Settings) -> list[str]:
    """Warnings about where LiteLLM would send the memory headers, or fail to.

    The memory user id and the Supermemory key belong to the models that go through
    the Supermemory router: there they must arrive, and no other provider should get
    them. Only runs when the file holds LiteLLM sections (a memproxy-only file says
    nothing about how LiteLLM is configured) and memory is not kept by memproxy itself.
    """
    sections = settings.litellm_sections
    if not sections or settings.memory.backend in OWN_MEMORY_BACKENDS:
        # memproxy keeps memory itself: where LiteLLM sends the headers gives no memory.
        return []
    routed, others = _model_routes(sections.get("model_list"))
    everywhere, listed = _forwarding(sections)
    header = settings.headers.user_id
    warnings: list[str] = []

    exposed = [name for name in others if everywhere or name in listed]
    if settings.headers.supermemory_api_key is not None and exposed:
        if everywhere:
            scope = "to every model (general_settings.forward_client_headers_to_llm_api: true)"
            undo = "remove general_settings.forward_client_headers_to_llm_api"
        else:
            scope = f"to {', '.join(listed)}"
            undo = f"take {', '.join(exposed)} off the forwarding list"
        warnings.append(
            "memproxy adds x-supermemory-api-key to every request (from "
            "memproxy.headers.supermemory_api_key, or $SUPERMEMORY_API_KEY when the config "
            f"does not set it) and LiteLLM forwards client headers {scope}, so the providers "
            f"of {', '.join(exposed)} receive your Supermemory key and {header}.\n"
            f"Fix: {undo}, set memproxy.headers.supermemory_api_key: null, and instead:\n"
            + _forwarding_fix(routed)
        )

    missing = [name for name in routed if not everywhere and name not in listed]
    if missing and listed:
        warnings.append(
            f"LiteLLM forwards client headers only for {', '.join(listed)}; requests to "
            f"{', '.join(missing)} reach the provider without {header}, so they get no memory.\n"
            + _forwarding_fix(routed)
        )
    elif missing:
        warnings.append(
            f"LiteLLM will silently drop {header}: header forwarding is off in this config, so "
            f"requests to {', '.join(missing)} reach the Supermemory router without a memory "
            "user id.\n" + _forwarding_fix(routed)
        )

    if others and not routed:
        warnings.append(
            f"No model in model_list goes through the Supermemory memory router, so {header} "
            "gives no request memory. A model goes through it when its litellm_params.api_base "
            "is the router's address, e.g. https://api.supermemory.ai/v3/api.anthropic.com.\n"
            + _forwarding_fix(routed)
        )
    return warnings


def _forwarding_fix(routed: list[str]) -> str:
    """How to send the memory headers to the Supermemory models and to no other."""
    names = ", ".join(routed) or "model-name, ..."
    return (
        "Forward client headers only to the models that go through the Supermemory router, "
        "and let LiteLLM add the Supermemory key to those models itself (same config.yaml):\n\n"
        "    litellm_settings:\n"
        "      model_group_settings:\n"
        f"        forward_client_headers_to_llm_api: [{names}]\n\n"
        "and in the litellm_params of each of those models:\n\n"
        "        extra_headers: {x-supermemory-api-key: os.environ/SUPERMEMORY_API_KEY}"
    )


def _forwarding(sections: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Whether LiteLLM forwards client headers to every model, and the per-model list."""
    general = sections.get("general_settings")
    everywhere = isinstance(general, Mapping) and \
        general.get("forward_client_headers_to_llm_api") is True
    litellm_settings = sections.get("litellm_settings")
    groups = litellm_settings.get("model_group_settings") if isinstance(
        litellm_settings, Mapping) else None
    listed = groups.get("forward_client_headers_to_llm_api") if isinstance(
        groups, Mapping) else None
    return everywhere, [str(name) for name in listed] if isinstance(listed, list) else []


def _model_routes(model_list: Any) -> tuple[list[str], list[str]]:
    """Model names going through the Supermemory router, and those going to other providers.

    A name with several deployments can be in both. Models LiteLLM answers itself
    (``mock_response``) are in neither: no provider sees their headers.
    """
    routed: list[str] = []
    others: list[str] = []
    for entry in model_list if isinstance(model_list, list) else ():
        name = entry.get("model_name") if isinstance(entry, Mapping) else None
        if not isinstance(name, str):
            continue
        params = entry.get("litellm_params")
        if not isinstance(params, Mapping):
            params = {}
        if params.get("mock_response") is not None:
            continue
        names = routed if goes_through_supermemory(params.get("api_base")) else others
        if name not in names:
            names.append(name)
    return routed, others
