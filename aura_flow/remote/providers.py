"""The hosted providers the remote client knows, and the words each one's messages use.

Shared by the key rules (keys.py), the address checks (endpoint.py), the answers (answers.py) and the client; each
provider's protocol lives in its own module: Segmind's in queue.py (v2) and sync.py (v1), fal's in fal.py (queue)
and fal_params.py (what each fal model takes).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ParameterError, shown


@dataclass(frozen=True)
class Provider:
    name: str
    label: str
    key_env: str  # the key's environment variable
    key_file_env: str  # the variable naming another key file
    key_file_name: str  # <config>/auraflow/<name>
    key_hint: str  # what a key looks like, for messages
    key_page: str  # where to get one
    url_env: str  # the variable that overrides the address
    default_url: str
    billing: str  # where to top up
    models: tuple  # the models it serves, the first the default


SEGMIND = Provider("segmind", "Segmind", "SEGMIND_API_KEY", "AURAFLOW_SEGMIND_KEY_FILE", "segmind_api_key",
                   "SG_ followed by 16 hex digits", "https://cloud.segmind.com/console/api-keys", "SEGMIND_API_URL",
                   "https://api.segmind.com/v1/aura-flow", "https://cloud.segmind.com/console/billing",
                   ("aura-flow",))
FAL = Provider("fal", "fal", "FAL_KEY", "AURAFLOW_FAL_KEY_FILE", "fal_key",
               "a key id and secret joined by ':'", "https://fal.ai/dashboard/keys", "FAL_QUEUE_URL",
               "https://queue.fal.run", "https://fal.ai/dashboard/billing", ("aura-flow", "pony-v7"))
PROVIDERS = {p.name: p for p in (SEGMIND, FAL)}
PROVIDER_NAMES = tuple(PROVIDERS)
MODEL_NAMES = ("aura-flow", "pony-v7")


def get_provider(choice=None, where: str = "provider") -> Provider:
    """The provider named by ``choice`` (None or "" is Segmind), else a ParameterError naming ``where``."""
    if choice is None or (isinstance(choice, str) and not choice.strip()):
        return SEGMIND
    if isinstance(choice, Provider):
        return choice
    value = str(choice).strip().lower() if isinstance(choice, str) else None
    if value not in PROVIDERS:
        raise ParameterError(f"{where}={shown(choice)} is not known; use {' or '.join(PROVIDER_NAMES)}")
    return PROVIDERS[value]


def check_model(provider: Provider, model=None, where: str = "model", provider_where: str = "provider") -> str:
    """The model to ask ``provider`` for (None: its default), else a ParameterError naming both settings."""
    if model is None or (isinstance(model, str) and not model.strip()):
        return provider.models[0]
    value = model.strip().lower() if isinstance(model, str) else None
    if value not in provider.models:
        others = [p.name for p in PROVIDERS.values() if value in p.models]
        hint = f" ({value} is served by {provider_where}={others[0]})" if others else ""
        raise ParameterError(f"{where}={shown(model)} is not served by {provider_where}={provider.name}; it serves "
                             f"{', '.join(provider.models)}{hint}")
    return value
